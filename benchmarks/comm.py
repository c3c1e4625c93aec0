"""Bytes and time of the dp gradient reduction under each scheme, on one gloo world laid
out as nodes: fp32, bf16, fp16 and int8 (error feedback) all-reduce and reduce-scatter,
and the hierarchical all-reduce (inside each node, across nodes, inside again).

The schemes take turns round by round on the same gradient buffer, so machine noise hits
them alike. One JSON line per scheme: median time per reduction and its ratio to fp32,
ledger wire bytes per rank (and the part across nodes) and their ratio to fp32, bytes on
the loopback interface per reduction (every gloo byte of every rank, headers included),
and the largest error against the exact fp32 sum relative to its largest entry.

    python benchmarks/comm.py --dp 8 --ranks-per-node 4 --mb 32 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.parallel.grad_reduce import GradReducer
from common import loopback_bytes, run_on_local_ranks

# (name, collective, compression, hierarchical)
SCHEMES = [
    ("all_reduce fp32", "all_reduce", "none", False),
    ("all_reduce bf16", "all_reduce", "bf16", False),
    ("all_reduce fp16", "all_reduce", "fp16", False),
    ("all_reduce int8", "all_reduce", "int8", False),
    ("hierarchical all_reduce fp32", "all_reduce", "none", True),
    ("hierarchical all_reduce bf16", "all_reduce", "bf16", True),
    ("reduce_scatter fp32", "reduce_scatter", "none", False),
    ("reduce_scatter bf16", "reduce_scatter", "bf16", False),
    ("reduce_scatter int8", "reduce_scatter", "int8", False),
]


def rank_main(rank: int, args, results):
    mesh = ParallelMesh.build(MeshShape(dp=args.dp), ranks_per_node=args.ranks_per_node)
    numel = int(args.mb * 2**20 / 4) // (args.dp * 1024) * (args.dp * 1024)  # every scheme's alignment
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 1e-3
    exact = grad.clone()
    dist.all_reduce(exact)
    shard = exact.view(args.dp, -1)[rank]
    reducers = {name: GradReducer(mesh, compression, hierarchical=hierarchical)
                for name, _op, compression, hierarchical in SCHEMES}
    times = {name: [] for name, *_ in SCHEMES}
    wire, inter, loopback, error = {}, {}, {}, {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, op, _compression, _hierarchical in SCHEMES:
            flat = grad.clone()
            out = torch.empty_like(shard)
            dist.barrier()
            mesh.ledger.reset()
            lo = loopback_bytes()
            start = time.perf_counter()
            if op == "all_reduce":
                reducers[name].all_reduce("bucket", flat).wait()
            else:
                reducers[name].reduce_scatter("bucket", flat, out).wait()
            elapsed = time.perf_counter() - start
            dist.barrier()
            if round_ == 0:
                continue
            times[name].append(elapsed)
            wire[name] = mesh.ledger.total("wire_bytes")
            inter[name] = mesh.ledger.total("inter_node_bytes")
            loopback[name] = loopback_bytes() - lo  # includes the barrier's few bytes
            result, target = (flat, exact) if op == "all_reduce" else (out, shard)
            error[name] = ((result - target).abs().max() / target.abs().max()).item()
    if rank == 0:
        baseline = {"all_reduce": "all_reduce fp32", "reduce_scatter": "reduce_scatter fp32"}
        for name, op, *_ in SCHEMES:
            base = baseline[op]
            results.put({
                "scheme": name, "dp": args.dp, "ranks_per_node": args.ranks_per_node,
                "gradient_bytes": numel * 4,
                "median_s": statistics.median(times[name]),
                "time_ratio_to_fp32": statistics.median(times[name]) / statistics.median(times[base]),
                "wire_bytes_per_rank": wire[name], "wire_ratio_fp32_over_this": wire[base] / wire[name],
                "inter_node_bytes_per_rank": inter[name],
                "loopback_bytes_all_ranks": loopback[name],
                "max_error_relative": error[name],
            })
    mesh.destroy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--ranks-per-node", type=int, default=4)
    parser.add_argument("--mb", type=float, default=32.0, help="fp32 gradient MiB per rank")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.dp % args.ranks_per_node:
        parser.error("--ranks-per-node must divide --dp")
    for line in run_on_local_ranks(rank_main, args.dp, args, len(SCHEMES)):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
