"""meshpar's pipeline runtime against torch.distributed.pipelining, in one run.

The same model (same weights), split into the same stages, on the same gloo ranks, runs
GPipe, 1F1B and interleaved 1F1B (2 chunks per rank) under both: PyTorch's
PipelineStage + Schedule* classes, and meshpar's schedules and interpreter. They
alternate step by step (forward and backward of one global batch, no optimizer), so
machine noise hits both alike. One JSON line per schedule: median step times, the ratio
ours/theirs (target <= 1.0), and the largest difference in loss and gradient norm.

    python benchmarks/pp_vs_torch.py --pp 2 --model small --microbatches 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.apply import split_model
from meshpar.pipeline.runtime import PipelineRuntime
from meshpar.pipeline.schedules import build_schedule
from meshpar.data.corpus import load_tokens
from meshpar.data.loader import BatchLoader
from common import run_on_local_ranks

SCHEDULES = [("gpipe", 1, ScheduleGPipe), ("1f1b", 1, Schedule1F1B), ("interleaved-1f1b", 2, ScheduleInterleaved1F1B)]


class OneStage(nn.Module):
    """One stage of meshpar's chunks as the plain module torch's PipelineStage expects."""

    def __init__(self, chunks, stage: int):
        super().__init__()
        self.chunks, self.stage = chunks, stage

    def forward(self, x):
        return self.chunks.forward_stage(self.stage, x)


def grad_norm(module) -> float:
    squares = sum(p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None)
    return float(squares)


def rank_main(rank: int, args, results):
    mesh = ParallelMesh.build(MeshShape(pp=args.pp))
    cfg = model_config(args.model)
    loader = BatchLoader(load_tokens(None)[0], args.seq_len, args.batch_size, 0, 1, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps)]
    tokens = args.batch_size * args.seq_len
    m = args.microbatches
    hidden = (args.batch_size // m, args.seq_len, cfg.hidden_size)

    def loss_sum(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    for name, v, torch_schedule_class in SCHEDULES:
        num_stages = args.pp * v
        ours = split_model(build_model(cfg, seed=0), mesh, num_stages=num_stages)
        runtime = PipelineRuntime(build_schedule(name, args.pp, v, m), ours.module, mesh, loss_sum,
                                  hidden, torch.device("cpu"), measure_activations=args.measure_activations)
        theirs = split_model(build_model(cfg, seed=0), mesh, num_stages=num_stages).module
        stages = [PipelineStage(OneStage(theirs, s), s, num_stages, torch.device("cpu"))
                  for s in range(rank, num_stages, args.pp)]
        torch_loss = lambda logits, y: loss_sum(logits, y) / tokens  # noqa: E731
        schedule = torch_schedule_class(stages if v > 1 else stages[0], m, loss_fn=torch_loss, scale_grads=False)

        def step_ours(x, y):
            ours.module.zero_grad()
            loss = runtime.run(list(x.chunk(m)), list(y.chunk(m)), tokens)
            return float(loss), grad_norm(ours.module)

        def step_theirs(x, y):
            theirs.zero_grad()
            losses = []
            first, last = rank == 0, rank == args.pp - 1  # stage 0 and the last stage are on these ranks
            if first and last:
                schedule.step(x, target=y, losses=losses)
            elif first:
                schedule.step(x)
            elif last:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
            return float(sum(loss.detach() for loss in losses)) if losses else 0.0, grad_norm(theirs)

        times = {"meshpar": [], "torch": []}
        loss_diff = norm_diff = 0.0
        for i, (x, y) in enumerate(batches):
            out = {}
            for who, step in (("meshpar", step_ours), ("torch", step_theirs)):
                dist.barrier()
                start = time.perf_counter()
                out[who] = step(x, y)
                if i > 0:  # the first step pays for set-up
                    times[who].append(time.perf_counter() - start)
            loss_diff = max(loss_diff, abs(out["meshpar"][0] - out["torch"][0]))
            norm_diff = max(norm_diff, abs(out["meshpar"][1] - out["torch"][1]) / max(out["torch"][1], 1e-30))
        gathered = [None] * args.pp
        dist.all_gather_object(gathered, (times, loss_diff, norm_diff))
        if rank == 0:
            ours_s = statistics.median(max(t["meshpar"][k] for t, _, _ in gathered) for k in range(args.steps - 1))
            theirs_s = statistics.median(max(t["torch"][k] for t, _, _ in gathered) for k in range(args.steps - 1))
            results.put({
                "benchmark": "pp_vs_torch", "schedule": name, "pp": args.pp, "virtual_stages": v,
                "microbatches": m, "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "timed_steps": args.steps - 1, "meshpar_measures_activations": args.measure_activations, "meshpar_step_s": round(ours_s, 4), "torch_step_s": round(theirs_s, 4),
                "ours_over_theirs": round(ours_s / theirs_s, 3),
                "max_abs_loss_diff": max(d for _, d, _ in gathered),
                "max_rel_grad_square_diff": max(d for _, _, d in gathered),
            })


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--measure-activations", action="store_true",
                        help="keep meshpar's saved-tensor accounting on (a hook per saved tensor)")
    args = parser.parse_args()
    for line in run_on_local_ranks(rank_main, args.pp, args, len(SCHEDULES)):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
