"""Collectives on nodes that share one network link each - the emulated cluster of
`meshpar cluster`, where every rank of a host sends through the host's one link: a
collective's time there is the bytes leaving a node, for all of an axis's groups at once,
over the link's rate.

Bytes leaving a node for one group of n ranks with k on each node (a ring follows rank
order, so one ring edge leaves each node it spans):

    all-reduce (ring)        2(n-1)/n x payload
    all-gather (ring)        (n-1)/n x payload     (payload: the gathered whole)
    reduce-scatter (ring)    (n-1)/n x payload     (payload: the input)
    all-to-all               k(n-k)/n x payload    (each of k ranks sends (n-k)/n of its input away)
    hierarchical all-reduce  2(M-1)/M x payload    (M nodes: the k shards each all-reduced across)

times the backend's measured bytes per formula byte (`Cluster.wire_factors`: gloo's
reduce-scatter is an all-reduce, 2x; `meshpar calibrate --emulated-cluster` measures each).
Every group of the axis with ranks on the node sends at once, so the node's link carries
K/k groups' bytes (K ranks per node). A group inside one node runs at the intra-node bus
bandwidth instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from meshpar.planner.hardware import Cluster

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "hierarchical")


def node_of(cluster: Cluster, round_robin: bool = False) -> Callable[[int], int]:
    """Global rank -> node: consecutive blocks of gpus_per_node (torchrun's placement), or
    dealt in turn (`meshpar cluster run --placement round-robin`)."""
    if round_robin:
        return lambda rank: rank % cluster.nodes
    return lambda rank: rank // cluster.gpus_per_node


def node_egress(op: str, payload: float, n: int, k: int, nodes: int) -> float:
    """Bytes the ring formulas say leave a node for one group of n ranks, k on each of
    `nodes` nodes (the table above)."""
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * payload
    if op == "all_to_all":
        return k * (n - k) / n * payload
    if op == "hierarchical":
        return 2 * (nodes - 1) / nodes * payload
    raise ValueError(f"unknown collective {op!r}; one of {', '.join(OPS)}")


def _intra(cluster: Cluster, op: str, payload: float, n: int) -> float:
    """A collective among n ranks of one node, at the intra-node bus bandwidth."""
    if n == 1:
        return 0.0
    gpu, eff = cluster.gpu, cluster.efficiency
    factor = {"all_reduce": 2 * (n - 1) / n, "all_to_all": (n - 1) / n}.get(op, (n - 1) / n)
    factor *= cluster.wire_factor(op)
    return gpu.intra_node_latency_us * 1e-6 + factor * payload / (gpu.intra_node_GBps * 1e9 * eff.intra_collective)


def collective_time(cluster: Cluster, op: str, payload: float, ranks: list[int],
                    node: Callable[[int], int]) -> float:
    """Seconds of one collective over `ranks` (every group of its axis running at once)."""
    n = len(ranks)
    if n == 1:
        return 0.0
    per_node = Counter(node(r) for r in ranks)
    k, nodes = per_node[node(ranks[0])], len(per_node)
    if nodes == 1:
        return _intra(cluster, "all_reduce" if op == "hierarchical" else op, payload, n)
    groups = max(1, cluster.gpus_per_node // k)
    egress = groups * node_egress(op, payload, n, k, nodes) * cluster.wire_factor(op)
    link = cluster.gpu.inter_node_latency_us * 1e-6 + egress / (cluster.node_link_GBps * 1e9
                                                                  * cluster.efficiency.inter_collective)
    if op == "hierarchical":  # reduce-scatter and all-gather inside the node around the link's part
        link += _intra(cluster, "reduce_scatter", payload, k) + _intra(cluster, "all_gather", payload, k)
    return link
