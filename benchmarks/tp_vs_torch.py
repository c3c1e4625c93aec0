"""meshpar's tensor parallelism against PyTorch's DTensor tensor parallelism, in one run.

Both shard the same model (same weights) over the same gloo ranks: PyTorch with
ColwiseParallel / RowwiseParallel / SequenceParallel and loss_parallel (the plan
torchtitan uses for Llama), meshpar with its own layers. They alternate step by step
(forward, loss, backward, AdamW) so machine noise hits both alike. One JSON line per
layout: the bytes every rank together sent over the loopback interface during one step,
for each - counted the same way for both, at the transport, so nothing either library
does internally escapes it - beside meshpar's ledger (ring wire bytes, all ranks), the
step-time ratio ours/theirs, and the loss difference.

    python benchmarks/tp_vs_torch.py --model small --tp 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.apply import split_model
from meshpar.data.corpus import load_tokens
from meshpar.data.loader import BatchLoader
from common import loopback_bytes, run_on_local_ranks


def torch_tp_plan(model, sp: bool) -> dict:
    seq = Shard(1) if sp else Replicate()
    plan = {
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        plan["norm"] = SequenceParallel()
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        plan.update({
            p + "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
            p + "attention.wq": ColwiseParallel(), p + "attention.wk": ColwiseParallel(),
            p + "attention.wv": ColwiseParallel(), p + "attention.wo": RowwiseParallel(output_layouts=seq),
            p + "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            p + "mlp.w_gate": ColwiseParallel(), p + "mlp.w_up": ColwiseParallel(),
            p + "mlp.w_down": RowwiseParallel(output_layouts=seq),
        })
        if sp:
            plan[p + "attention_norm"] = SequenceParallel()
            plan[p + "mlp_norm"] = SequenceParallel()
    return plan


def rank_main(rank: int, args, results):
    cfg = model_config(args.model)
    loader = BatchLoader(load_tokens(None)[0], args.seq_len, args.batch_size, 0, 1, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps)]
    tokens = args.batch_size * args.seq_len

    for sp in (False, True):
        ours = split_model(build_model(cfg, seed=0), ParallelMesh.build(MeshShape(tp=args.tp)), sequence_parallel=sp)
        ours_opt = torch.optim.AdamW(ours.module.parameters(), lr=3e-4)
        theirs = build_model(cfg, seed=0)
        parallelize_module(theirs, init_device_mesh("cpu", (args.tp,)), torch_tp_plan(theirs, sp))
        for layer in theirs.layers:  # local heads, as torchtitan does
            layer.attention.num_heads //= args.tp
            layer.attention.num_kv_heads //= args.tp
        theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=3e-4)

        def step_ours(x, y):
            ours_opt.zero_grad()
            loss = ours.loss_sum(ours.module(x), y) / tokens
            loss.backward()
            ours.sync_grads()
            ours_opt.step()
            return loss.item()

        def step_theirs(x, y):
            theirs_opt.zero_grad()
            with loss_parallel():
                loss = F.cross_entropy(theirs(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens
                loss.backward()
            theirs_opt.step()
            return loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item()

        times = {"meshpar": [], "torch": []}
        counted: dict = {}
        diffs = []
        for i, (x, y) in enumerate(batches):
            losses = {}
            for name, step in (("meshpar", step_ours), ("torch", step_theirs)):
                dist.barrier()
                if i == 0:  # count bytes on a step of its own, untimed
                    before, ledger_before = loopback_bytes(), ours.mesh.ledger.total("wire_bytes")
                    losses[name] = step(x, y)
                    dist.barrier()
                    counted[name] = loopback_bytes() - before
                    if name == "meshpar":
                        counted["ledger"] = (ours.mesh.ledger.total("wire_bytes") - ledger_before) * args.tp
                    continue
                start = time.perf_counter()
                losses[name] = step(x, y)
                times[name].append(time.perf_counter() - start)
            diffs.append(abs(losses["meshpar"] - losses["torch"]) / losses["torch"])
        if rank == 0:
            ours_s, theirs_s = statistics.median(times["meshpar"]), statistics.median(times["torch"])
            results.put({
                "benchmark": "tp_vs_torch", "model": args.model, "tp": args.tp, "sequence_parallel": sp,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "timed_steps": args.steps - 1,
                "meshpar_loopback_bytes_per_step": counted["meshpar"],
                "torch_loopback_bytes_per_step": counted["torch"],
                "meshpar_ledger_wire_bytes_per_step": round(counted["ledger"]),
                "meshpar_step_s": round(ours_s, 4), "torch_step_s": round(theirs_s, 4),
                "ours_over_theirs": round(ours_s / theirs_s, 3), "max_rel_loss_diff": max(diffs),
            })


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    for line in run_on_local_ranks(rank_main, args.tp, args, 2):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
