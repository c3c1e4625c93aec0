"""transformers' LlamaForCausalLM through meshpar against meshpar's own Llama of the same
shape, in one run, and against transformers' own tensor parallelism.

1. tp2 x dp2 (4 gloo ranks): each rank holds both models - transformers' split by
   `meshpar.hf_plan`, meshpar's by its own plan, the same shape (the `small` preset:
   8 layers, hidden 256, 8 heads over 4 KV heads, MLP 704, vocabulary 256) - and they
   alternate step by step (forward, loss, backward, dp reduction, AdamW) so machine
   noise hits both alike. Reports the median step time of each and the ratio.
2. tp2 (2 gloo ranks): transformers' own tensor parallelism, `from_pretrained(...,
   tp_plan="auto")`, one training step (forward with labels, backward, AdamW) against
   meshpar's tp2 of the same directory, alternating; both compute the loss of every
   position's next token, and their losses are compared step by step. If transformers'
   TP does not run (it needs the `accelerate` package), the line says so with its error.

    python benchmarks/hf_vs_native.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

import meshpar
from common import random_batches, run_on_local_ranks, timed_across_ranks
from meshpar.model import build_model, model_config
from meshpar.model.llama import init_rule
from meshpar.parallel.llama_plan import llama_plan

SEQ, BATCH = 128, 8


def llama_config(cfg):
    import transformers

    return transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                    intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                                    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                    max_position_embeddings=cfg.max_seq_len, use_cache=False)


def against_native(rank: int, args, results) -> None:
    """Part 1: both models through meshpar at tp2 x dp2, alternating."""
    import transformers

    cfg = model_config("small")
    mesh = meshpar.init_mesh(dp=2, tp=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(cfg))
    theirs = meshpar.parallelize(hf, mesh, meshpar.hf_plan(hf), zero=1, microbatches=1)
    ours = meshpar.parallelize(build_model(cfg, 0, "meta"), mesh, llama_plan(cfg), zero=1, microbatches=1,
                               init=lambda name: init_rule(cfg, name), seed=0)
    times = {"transformers": [], "meshpar": []}  # (the two start from different weights)
    for i, (x, y) in enumerate(random_batches(args.steps + 1, BATCH, SEQ, 2, mesh.index("dp"))):
        for name, model in (("transformers", theirs), ("meshpar", ours)):
            seconds = timed_across_ranks(lambda: model.step(x, y))
            if i:  # the first step warms up
                times[name].append(seconds)
    if rank == 0:
        a, b = statistics.median(times["transformers"]), statistics.median(times["meshpar"])
        results.put({"part": "transformers Llama through meshpar vs meshpar's Llama", "layout": "tp2 x dp2 ZeRO-1",
                     "shape": "small (8 layers, hidden 256)", "steps": args.steps,
                     "transformers_through_meshpar_s": round(a, 4), "meshpar_llama_s": round(b, 4),
                     "ratio": round(a / b, 3)})
    mesh.destroy()


def against_transformers_tp(rank: int, args, results) -> None:
    """Part 2: transformers' tp_plan="auto" against meshpar's tp2, both from one directory."""
    import transformers

    cfg = model_config("small")
    directory = args.directory
    if rank == 0:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(llama_config(cfg)).save_pretrained(directory)
    dist.barrier()
    line = {"part": "transformers' own tensor parallelism vs meshpar", "layout": "tp2", "steps": args.steps}
    try:
        native = transformers.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto", dtype=torch.float32)
        optimizer = torch.optim.AdamW(native.parameters(), lr=3e-4, weight_decay=0.0)

        def native_step(x, y) -> float:  # the loss meshpar computes: every position's next token
            loss = torch.nn.functional.cross_entropy(native(input_ids=x).logits.flatten(0, 1), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.item()
    except Exception as err:  # reported, not raised: whether it runs on CPU is the finding
        if rank == 0:
            results.put({**line, "transformers_tp": f"does not run on CPU/gloo: {type(err).__name__}: "
                                                   f"{str(err).splitlines()[0][:300]}"})
            traceback.print_exc()
        return
    mesh = meshpar.init_mesh(tp=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    # the same AdamW as transformers' side: no decay, no clipping, torch's betas
    ours = meshpar.parallelize(hf, mesh, meshpar.hf_plan(hf), microbatches=1, lr=3e-4, weight_decay=0.0,
                               beta2=0.999, max_grad_norm=0.0)
    times, losses = {"transformers_tp": [], "meshpar": []}, {"transformers_tp": [], "meshpar": []}
    for i, (x, y) in enumerate(random_batches(args.steps + 1, BATCH, SEQ, 1, 0)):
        for name, step in (("transformers_tp", native_step), ("meshpar", ours.step)):
            seconds = timed_across_ranks(lambda: losses[name].append(step(x, y)))
            if i:
                times[name].append(seconds)
    if rank == 0:
        a, b = statistics.median(times["transformers_tp"]), statistics.median(times["meshpar"])
        gap = max(abs(p - q) / q for p, q in zip(losses["meshpar"], losses["transformers_tp"]))
        results.put({**line, "transformers_tp_s": round(a, 4), "meshpar_s": round(b, 4), "ratio": round(b / a, 3),
                     "loss_rel_diff_max": float(f"{gap:.2e}")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    # part 1 is independent of part 2's directory
    for line in run_on_local_ranks(against_native, 4, args, 1):
        print(json.dumps(line), flush=True)
    with tempfile.TemporaryDirectory() as directory:
        args.directory = os.path.join(directory, "llama")
        for line in run_on_local_ranks(against_transformers_tp, 2, args, 1):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
