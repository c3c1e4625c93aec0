"""The network of an emulated cluster as the planner sees it, measured from inside: run on
every rank by `meshpar calibrate --emulated-cluster` (through `meshpar cluster run`).

For each collective over all ranks - all-reduce, all-gather, reduce-scatter, all-to-all -
the seconds it takes and the bytes that leave host 0 (its eth0's counter, read by its
first rank between barriers), and the seconds of a one-element all-reduce (the latency).
Rank 0 writes them as JSON to --out.

    python meshpar/cluster/probe.py --out network.json --megabytes 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _sent() -> int:
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        return int(f.read())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--megabytes", type=float, default=8.0, help="payload per rank")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    size = int(args.megabytes * 2**20) // 4 // n * n  # fp32 elements, divisible by n
    x = torch.ones(size)
    ops = {
        "all_reduce": (lambda: dist.all_reduce(x), 4 * size),
        "all_gather": (lambda out=torch.empty(size): dist.all_gather_into_tensor(out, x[: size // n]), 4 * size),
        "reduce_scatter": (lambda out=torch.empty(size // n): dist.reduce_scatter_tensor(out, x), 4 * size),
        "all_to_all": (lambda out=torch.empty(size): dist.all_to_all_single(out, x), 4 * size),
    }
    measured = {}
    for name, (fn, payload) in ops.items():
        fn()  # connections and buffers made
        best = None
        for _ in range(2):
            dist.barrier()
            before, start = _sent(), time.perf_counter()
            fn()
            dist.barrier()
            seconds, sent = time.perf_counter() - start, _sent() - before
            best = min(best or (seconds, sent), (seconds, sent))
        measured[name] = {"seconds": best[0], "host_bytes": best[1], "payload": payload}
    one = torch.ones(1)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(one)
    latency = (time.perf_counter() - start) / 20
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": n, "ranks_per_host": int(os.environ.get("LOCAL_WORLD_SIZE", n)),
                       "collectives": measured, "latency_s": latency}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
