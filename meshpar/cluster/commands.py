"""`meshpar cluster`: up, run, link, status, down (see emulated.py).

    meshpar cluster up --nodes 2 --ranks-per-node 2 --link 200mbit
    meshpar cluster run -- meshpar train --dp 4 --hierarchical-allreduce --steps 20
    meshpar cluster link 1 down          # while the job runs; `up` again, or a new rate
    meshpar cluster down
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from meshpar.cluster import emulated
from meshpar.cluster.emulated import ClusterError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", default=str(emulated.DEFAULT_STATE),
                        help=f"the file recording what was made (default {emulated.DEFAULT_STATE})")
    actions = parser.add_subparsers(dest="action", required=True)
    make = actions.add_parser("up", help="make the hosts and their links")
    make.add_argument("--nodes", type=int, required=True, help="hosts (network namespaces)")
    make.add_argument("--ranks-per-node", type=int, required=True, help="ranks each host's torchrun starts")
    make.add_argument("--prefix", default="mpc", help="the namespaces' names: PREFIX-sw, PREFIX-h0, ... (mpc)")
    make.add_argument("--link", default="1gbit", help="each host's link: RATE[,DELAY[,LOSS]] (tc units: "
                                                      "200mbit,1ms,2%%; default 1gbit)")
    run = actions.add_parser("run", help="run a command on every host: one torchrun per host")
    run.add_argument("--port", type=int, default=29500, help="host 0's rendezvous port (29500)")
    run.add_argument("--placement", choices=("consecutive", "round-robin"), default="consecutive",
                     help="consecutive: one torchrun per host, host i holding ranks i*K...(i+1)*K-1 (default); "
                          "round-robin: the ranks started directly, rank r on host r mod N - consecutive ranks (a "
                          "tp group) on different hosts, to measure what placement saves")
    run.add_argument("--max-restarts", type=int, default=0, help="torchrun's: a host whose ranks fail restarts "
                                                                     "them up to N times, the others rejoining (0)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="meshpar train ... (or a script and its flags)")
    link = actions.add_parser("link", help="one host's link: down, up, or RATE[,DELAY[,LOSS]]")
    link.add_argument("host", type=int)
    link.add_argument("how")
    actions.add_parser("status", help="what is up")
    actions.add_parser("down", help="remove everything the cluster made (after a crash too)")


def run_on_hosts(state: emulated.ClusterState, command: list[str], port: int, placement: str = "consecutive",
                 max_restarts: int = 0) -> int:
    """Every host's torchrun (or, dealt round-robin, every rank), to the end; the worst
    exit code. Ctrl-C or SIGTERM stops them."""
    if placement != "consecutive" and max_restarts:
        raise ClusterError("--max-restarts needs torchrun, which places ranks consecutively; drop --placement")
    commands = ([emulated.host_command(state, i, command, port, max_restarts) for i in range(state.nodes)]
                if placement == "consecutive" else emulated.dealt_rank_commands(state, command, port))
    hosts = [subprocess.Popen(argv) for argv in commands]

    def stop(*_):
        for host in hosts:
            if host.poll() is None:
                host.send_signal(signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        codes = [host.wait() for host in hosts]
    except KeyboardInterrupt:
        stop()
        codes = [host.wait() for host in hosts]
    finally:
        signal.signal(signal.SIGTERM, previous)
    return max(codes, key=abs)


def cluster_command(args) -> int:
    path = Path(args.state)
    try:
        if args.action == "up":
            state = emulated.up(args.nodes, args.ranks_per_node, emulated.Link.parse(args.link), path, args.prefix)
            print(f"meshpar cluster: {state.nodes} hosts x {state.ranks_per_node} ranks, each host's link "
                  f"{state.link.describe()}; host i is {emulated.SUBNET}.<i+1> in namespace {state.host(0)[:-1]}<i>")
            return 0
        if args.action == "down":
            removed = emulated.down(path)
            print(f"meshpar cluster: removed {', '.join(removed)}" if removed else "meshpar cluster: nothing was up")
            return 0
        if args.action == "link":
            print(f"meshpar cluster: {emulated.set_link(args.host, args.how, path)}")
            return 0
        state = emulated.load(path)
        if args.action == "status":
            links = ", ".join(f"host {h} {how}" for h, how in sorted(state.links.items()))
            print(f"meshpar cluster: {state.nodes} hosts x {state.ranks_per_node} ranks, link "
                  f"{state.link.describe()}; {links}")
            return 0
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            raise ClusterError("give the command after --, e.g. `meshpar cluster run -- meshpar train --dp 4`")
        emulated.check_privileges()
        return run_on_hosts(state, command, args.port, args.placement, args.max_restarts)
    except ClusterError as err:
        print(f"meshpar cluster: {err}", file=sys.stderr)
        return 2
