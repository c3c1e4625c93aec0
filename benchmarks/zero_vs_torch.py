"""meshpar's ZeRO against PyTorch's own data parallelism, in one run on one gloo world:
ZeRO-0 (bucketed all-reduce overlapped with backward) against DistributedDataParallel,
and ZeRO-3 (parameters sharded, gathered per layer) against FSDP2's `fully_shard`.

All four train the same model from the same weights on the same batches, alternating
step by step so machine noise hits them alike. Prints one JSON line per pair: median step
times and their ratio (meshpar / torch: at most 1.0 means meshpar is as fast or faster),
bytes on the loopback interface per step for each (every gloo byte, headers included),
meshpar's ledger wire bytes per step, and the largest loss difference (the same numbers
are computed, so it should be ~1e-6).

    python benchmarks/zero_vs_torch.py --model small --dp 4 --steps 12
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
from meshpar.parallel.zero import ShardedDataParallel, units_of
from meshpar.data.corpus import load_tokens
from meshpar.data.loader import BatchLoader
from meshpar.train.optim import OptimizerOptions, adamw
from common import loopback_bytes, run_on_local_ranks

LR = 3e-4


def meshpar_step(model, zero, optimizer, global_tokens):
    def step(x, y):
        zero.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / global_tokens
        loss.backward()
        zero.finish_reduction()
        zero.step(optimizer)
        return loss.item() * zero.n  # this rank's share of the mean, rescaled to its own mean
    return step


def torch_step(model, optimizer):
    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # both average over ranks
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def rank_main(rank: int, args, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = ParallelMesh.build(MeshShape(dp=args.dp))
    cfg = model_config(args.model)
    loader = BatchLoader(load_tokens(None)[0], args.seq_len, args.global_batch_size, rank, args.dp, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps)]
    global_tokens = args.global_batch_size * args.seq_len
    train_cfg = OptimizerOptions(lr=LR, weight_decay=0.0)

    steps = {}
    for stage in (0, 3):
        model = build_model(cfg, seed=0)
        zero = ShardedDataParallel(model, mesh, stage, bucket_bytes=25 * 2**20)
        steps[f"meshpar_zero{stage}"] = meshpar_step(model, zero, adamw(*zero.optimizer_params(), train_cfg),
                                                     global_tokens)
    ddp = DistributedDataParallel(build_model(cfg, seed=0), bucket_cap_mb=25)
    betas = (train_cfg.beta1, train_cfg.beta2)  # the same AdamW as meshpar's
    steps["ddp"] = torch_step(ddp, torch.optim.AdamW(ddp.parameters(), lr=LR, betas=betas, weight_decay=0.0))
    fsdp = build_model(cfg, seed=0)
    device_mesh = init_device_mesh("cpu", (args.dp,))
    for unit in units_of(fsdp):  # the same granularity as meshpar's ZeRO-3 gathers
        fully_shard(unit, mesh=device_mesh, reshard_after_forward=True)
    fully_shard(fsdp, mesh=device_mesh)
    steps["fsdp2"] = torch_step(fsdp, torch.optim.AdamW(fsdp.parameters(), lr=LR, betas=betas, weight_decay=0.0))

    times = {name: [] for name in steps}
    wire, ledger = {}, {}
    diffs = {"zero0": [], "zero3": []}
    for i, (x, y) in enumerate(batches):
        losses = {}
        for name, step in steps.items():
            dist.barrier()
            if i == 0:  # count bytes on a step of its own, untimed
                before, ledger_before = loopback_bytes(), mesh.ledger.total("wire_bytes", axis="dp")
                losses[name] = step(x, y)
                dist.barrier()
                wire[name] = loopback_bytes() - before
                ledger[name] = (mesh.ledger.total("wire_bytes", axis="dp") - ledger_before) * args.dp
                continue
            start = time.perf_counter()
            losses[name] = step(x, y)
            times[name].append(time.perf_counter() - start)
        diffs["zero0"].append(abs(losses["meshpar_zero0"] - losses["ddp"]) / losses["ddp"])
        diffs["zero3"].append(abs(losses["meshpar_zero3"] - losses["fsdp2"]) / losses["fsdp2"])
    if rank == 0:
        for ours, theirs, key in (("meshpar_zero0", "ddp", "zero0"), ("meshpar_zero3", "fsdp2", "zero3")):
            ours_s, theirs_s = statistics.median(times[ours]), statistics.median(times[theirs])
            results.put({
                "benchmark": "zero_vs_torch", "pair": f"{ours} vs {theirs}", "model": args.model,
                "num_params": cfg.num_params(), "dp": args.dp, "global_batch_size": args.global_batch_size,
                "seq_len": args.seq_len, "timed_steps": args.steps - 1,
                f"{ours}_step_s": round(ours_s, 4), f"{theirs}_step_s": round(theirs_s, 4),
                "ours_over_theirs": round(ours_s / theirs_s, 3),
                f"{ours}_loopback_bytes_per_step": wire[ours], f"{theirs}_loopback_bytes_per_step": wire[theirs],
                f"{ours}_ledger_wire_bytes_per_step_all_ranks": round(ledger[ours]),
                "max_rel_loss_diff": max(diffs[key]),
            })


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    for line in run_on_local_ranks(rank_main, args.dp, args, 2):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
