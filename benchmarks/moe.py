"""Expert parallelism against replicated experts, on 4 gloo ranks.

A mixture-of-experts model (tiny-moe's 8 layers of hidden 64, with `--experts` experts
of width `--expert-width`, top-2) trained three ways on the same batches, alternating
step by step so machine noise hits all alike:

    meshpar ep4    each rank holds 1/4 of every layer's experts, tokens exchanged by
                   all-to-all, the experts' gradients reduced over edp (1 rank: none)
    meshpar dp4    every rank holds every expert, all gradients all-reduced over dp
    torch DDP      PyTorch's DistributedDataParallel over the same model, experts
                   replicated (PyTorch has no expert parallelism of its own to run on CPU)

Reports the median step time of each, the ratios, the bytes each rank holds for its
parameters, and each rank's all-to-all and all-reduce bytes per step (meshpar's ledger).

    python benchmarks/moe.py --steps 6
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.distributed as dist

import meshpar
from common import random_batches, run_on_local_ranks, timed_across_ranks
from meshpar.model import build_model, model_config
from meshpar.model.llama import init_rule
from meshpar.model.loss import cross_entropy_sum
from meshpar.parallel.llama_plan import llama_plan

BATCH, SEQ = 16, 128


def rank_main(rank: int, args, results) -> None:
    torch.set_num_threads(1)
    cfg = model_config("tiny-moe", num_experts=args.experts, ffn_hidden_size=args.expert_width)
    init = functools.partial(init_rule, cfg)
    runs = {}
    for name, ep in (("meshpar ep4", 4), ("meshpar dp4", 1)):
        mesh = meshpar.init_mesh(dp=4, ep=ep)
        runs[name] = (mesh, meshpar.parallelize(build_model(cfg, 0, "meta"), mesh, llama_plan(cfg), init=init,
                                                seed=0, microbatches=1))
    model = build_model(cfg, 0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    for layer in model.modules():
        if hasattr(layer, "loss_normalizer"):
            layer.loss_normalizer = 1.0 / (BATCH * SEQ)

    def ddp_step(x, y):
        loss = cross_entropy_sum(ddp(x), y) / (BATCH * SEQ)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    times = {name: [] for name in (*runs, "torch DDP")}
    traffic = {}
    for step, (x, y) in enumerate(random_batches(args.steps + 1, BATCH, SEQ, 4, rank)):
        for name, (mesh, parallel) in runs.items():
            before = {op: mesh.ledger.total("bytes", op=op) for op in ("all_to_all", "all_reduce")}
            seconds = timed_across_ranks(lambda: parallel.step(x, y))
            traffic[name] = {op: mesh.ledger.total("bytes", op=op) - before[op] for op in before}
            if step:  # the first step warms up
                times[name].append(seconds)
        seconds = timed_across_ranks(lambda: ddp_step(x, y))
        if step:
            times["torch DDP"].append(seconds)
    held = {name: sum(p.numel() * p.element_size() for p in parallel.split.module.parameters())
            for name, (_, parallel) in runs.items()}
    held["torch DDP"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if rank == 0:
        results.put({name: {"step_s": statistics.median(t), "param_bytes_per_rank": held[name],
                            **({f"{op}_bytes_per_step": v for op, v in traffic[name].items()}
                               if name in traffic else {})}
                     for name, t in times.items()})
    for mesh, _ in runs.values():
        mesh.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=256)
    args = parser.parse_args()
    print(f"tiny-moe with {args.experts} experts of width {args.expert_width}, top-2; batch {BATCH} x {SEQ} "
          f"tokens over 4 ranks; median of {args.steps} steps", flush=True)
    out = run_on_local_ranks(rank_main, 4, args, 1)[0]
    base = out["meshpar ep4"]["step_s"]
    for name, r in out.items():
        extra = "".join(f"  {k.replace('_bytes_per_step', '')} {v / 2**20:7.2f} MiB/step" for k, v in r.items()
                        if k.endswith("_per_step"))
        print(f"{name:12s} step {r['step_s']:.3f} s  ({r['step_s'] / base:.3f} x ep4's)  "
              f"parameters per rank {r['param_bytes_per_rank'] / 2**20:6.2f} MiB{extra}")


if __name__ == "__main__":
    main()
