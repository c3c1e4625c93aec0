"""A cluster emulated on one machine (network namespaces and shaped links) for
multi-node rehearsal: `meshpar cluster`."""
