"""meshpar's data parallelism against PyTorch's DistributedDataParallel, in one run.

Both train the same model from the same weights on the same batches, on the same gloo
world, alternating step by step so machine noise hits both alike. Prints one JSON line:
median step times, their ratio (DDP / meshpar: above 1 means meshpar is faster), the
largest loss difference between the two (they compute the same thing), and the bytes
meshpar's ledger counted per step against the analytic 4 * num_params.

Note: DDP overlaps its all-reduce with backward; meshpar reduces after backward (overlap
arrives with the sharded data-parallel work), so on a slow interconnect DDP should win.

    python benchmarks/data_parallel_buckets.py --model small --dp 4 --steps 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.data import DataParallelReducer
from meshpar.train.data import BatchLoader, load_tokens
from common import run_on_local_ranks


def rank_main(rank: int, args, results):
    mesh = ParallelMesh.build(MeshShape(dp=args.dp))
    cfg = model_config(args.model)
    loader = BatchLoader(load_tokens(None)[0], args.seq_len, args.global_batch_size, rank, args.dp, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps)]
    global_tokens = args.global_batch_size * args.seq_len

    ours = build_model(cfg, seed=0)
    reducer = DataParallelReducer(list(ours.parameters()), mesh, bucket_bytes=25 * 2**20)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=3e-4)
    ddp = DistributedDataParallel(build_model(cfg, seed=0), bucket_cap_mb=25)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=3e-4)

    def step_meshpar(x, y):
        reducer.zero_grad()
        loss = F.cross_entropy(ours(x).flatten(0, 1), y.flatten(), reduction="sum") / global_tokens
        loss.backward()
        reducer.reduce()
        ours_opt.step()
        return loss.item() * args.dp  # this rank's share of the mean, rescaled to its own mean

    def step_ddp(x, y):
        ddp_opt.zero_grad()
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())  # DDP averages over ranks
        loss.backward()
        ddp_opt.step()
        return loss.item()

    times = {"meshpar": [], "ddp": []}
    loss_diffs = []
    for x, y in batches:
        losses = {}
        for name, step in (("meshpar", step_meshpar), ("ddp", step_ddp)):
            dist.barrier()
            start = time.perf_counter()
            losses[name] = step(x, y)
            times[name].append(time.perf_counter() - start)
        loss_diffs.append(abs(losses["meshpar"] - losses["ddp"]) / abs(losses["ddp"]))
    ledger_bytes = mesh.ledger.total("bytes", axis="dp", tag="grads")
    if rank == 0:
        timed = slice(2, None)  # the first steps pay for allocation and warm-up
        ours_s = statistics.median(times["meshpar"][timed])
        ddp_s = statistics.median(times["ddp"][timed])
        results.put({
            "benchmark": "data_parallel_buckets", "model": args.model, "dp": args.dp,
            "global_batch_size": args.global_batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "meshpar_step_s": round(ours_s, 4), "ddp_step_s": round(ddp_s, 4),
            "ddp_over_meshpar": round(ddp_s / ours_s, 3),
            "max_rel_loss_diff": max(loss_diffs),
            "meshpar_grad_bytes_per_step": ledger_bytes // args.steps,
            "analytic_grad_bytes_per_step": 4 * cfg.num_params(),
        })


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    for line in run_on_local_ranks(rank_main, args.dp, args, 1):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
