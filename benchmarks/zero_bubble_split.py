"""The zero-bubble backward split (I, then W) of one middle pipeline stage, two ways,
beside one plain backward of the same stage:

- generic: I = autograd.grad with respect to the stage input (graph kept), W = a
  backward restricted to the parameters, which walks the graph again;
- at the linear layers (what meshpar runs, meshpar/pipeline/weight_grads.py): I = one
  backward with the linear layers' weight products held back, W = those products.

Prints, per variant, the FLOPs of I and W (counted: machine-independent), their time
(median of the repeats, interleaved so the machine's noise falls on all alike), and the
bytes the micro-batch holds between I and W - what autograd kept, or what the linear
layers hold - and the time ratios against the plain backward and forward (the split at
the linear layers routes the forward's `F.linear` calls through a torch-function mode).

    python benchmarks/zero_bubble_split.py [--model small --layers 4 --batch 4 --seq 256 --repeats 11]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from meshpar.model import model_config
from meshpar.model.llama import build_model
from meshpar.pipeline.weight_grads import DeferredWeightGrads


class Stage(nn.Module):
    """`layers` transformer blocks: hidden in, hidden out, as a middle pipeline stage."""

    def __init__(self, model: nn.Module, layers: int, seq: int):
        super().__init__()
        self.layers = nn.ModuleList(model.layers[:layers])
        self.cos, self.sin = model.rope_cos[:seq], model.rope_sin[:seq]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return x


def held_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def run_once(stage: Stage, x: torch.Tensor, grad: torch.Tensor, variant: str, count: bool,
             store: DeferredWeightGrads | None) -> dict:
    """One forward and the variant's backward; times (and with `count`, FLOPs) of its
    passes. `store`: the split at the linear layers, installed on `stage` (variant
    "linears" only)."""
    params = list(stage.parameters())
    lasting = {t.data_ptr() for t in [*params, *stage.buffers()]}
    saved = []  # what autograd keeps, to weigh it between I and W

    def pack(t):
        saved.append(t)
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if store is not None:
            with store.recording():
                out = stage(x)
        else:
            out = stage(x)
    result = {"F_s": time.perf_counter() - start}
    passes = {"plain": [("B", lambda: torch.autograd.backward(out, grad))],
              "generic": [("I", lambda: torch.autograd.grad(out, [x], grad, retain_graph=True)),
                          ("W", lambda: torch.autograd.backward(out, grad, inputs=params))],
              "linears": [("I", lambda: _input_pass(store, out, grad)),
                          ("W", lambda: store.weight_pass((0, 0)))]}[variant]
    for name, fn in passes:
        if count:
            with FlopCounterMode(display=False) as counter:
                fn()
            result[name + "_flops"] = counter.get_total_flops()
        else:
            start = time.perf_counter()
            fn()
            result[name + "_s"] = time.perf_counter() - start
        if name == "I":  # generic: the whole graph is kept for W; at the linears: what they hold
            kept = store.held_tensors() if store is not None else saved
            result["held_bytes"] = held_bytes([t for t in kept if t.data_ptr() not in lasting])
    for p in params:
        p.grad = None
    x.grad = None
    return result


def _input_pass(store: DeferredWeightGrads, out: torch.Tensor, grad: torch.Tensor):
    with store.input_pass((0, 0)):
        torch.autograd.backward(out, grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    cfg = model_config(args.model)
    torch.manual_seed(0)
    stage = Stage(build_model(cfg, seed=0), args.layers, args.seq)
    split_stage = copy.deepcopy(stage)  # the same weights, with the split's forward hooks
    store = DeferredWeightGrads(split_stage)
    x = torch.randn(args.batch, args.seq, cfg.hidden_size, requires_grad=True)
    grad = torch.randn_like(x)
    variants = ("plain", "generic", "linears")

    def run(variant: str, count: bool) -> dict:
        split = variant == "linears"
        return run_once(split_stage if split else stage, x, grad, variant, count, store if split else None)

    counts = {v: run(v, count=True) for v in variants}
    times = {v: [] for v in variants}
    run("plain", count=False)  # warm-up
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(run(v, count=False))
    median = {v: {k: statistics.median(r[k] for r in times[v]) for k in times[v][0] if k.endswith("_s")}
              for v in variants}
    plain_s = median["plain"]["B_s"]
    print(f"{args.model}, {args.layers} layers, {args.batch} x {args.seq} tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| split | I GFLOP | W GFLOP | I + W over B (FLOPs) | I + W time over B | forward time over plain "
          "| held between I and W |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    b_flops = counts["plain"]["B_flops"]
    print(f"| none (one backward) | {b_flops / 1e9:.3f} (B) | - | 1.000 | 1.000 | 1.000 | - |")
    for v, label in (("generic", "generic"), ("linears", "at the linear layers")):
        c, m = counts[v], median[v]
        print(f"| {label} | {c['I_flops'] / 1e9:.3f} | {c['W_flops'] / 1e9:.3f} | "
              f"{(c['I_flops'] + c['W_flops']) / b_flops:.3f} | {(m['I_s'] + m['W_s']) / plain_s:.3f} | "
              f"{m['F_s'] / median['plain']['F_s']:.3f} | {c['held_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
