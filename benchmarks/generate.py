"""Decode speed of meshpar's generation against transformers' `generate`, on the same
model and prompts, and at tp2 against tp1.

The model is transformers' LlamaForCausalLM with random weights (default: 8 layers,
hidden 512, 8 heads over 4 KV heads, MLP 1408, Llama 2's 32000-token vocabulary; `--size
1b`: TinyLlama's shape, 22 layers of hidden 2048, for a GPU). Prompts are 32 random
tokens each, decoded greedily.

1. One rank, batch 1 and 8: transformers' `generate` (its own KV cache, sdpa attention)
   against `meshpar.serve.generate_batch` on the model split by `hf_plan` (a copy of the
   same weights), alternating, `--reps` times each. Decode time is the time of N new
   tokens less the time of 1 (the prompt's forward and the first token), for both, so
   decode tokens per second = batch x (N - 1) / that. Reports each median, the ratio
   (meshpar / transformers), and whether the tokens are the same.
2. tp2 (2 gloo ranks, each with half the threads) against tp1 at batch 8, the same way.

    python benchmarks/generate.py --new-tokens 64 --reps 3
    python benchmarks/generate.py --size 1b --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import meshpar
from common import run_on_local_ranks
from meshpar.serve.generate import generate_batch

SIZES = {"small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4),
         "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4)}
PROMPT_TOKENS = 32


def build(size: str, dtype: torch.dtype, device: str):
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **SIZES[size])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32000, (batch, PROMPT_TOKENS), generator=g).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def transformers_run(model, batch: int, new: int, device: str):
    ids = torch.tensor(prompts(batch), device=device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, PROMPT_TOKENS:].tolist()


def meshpar_run(split, batch: int, new: int):
    return [g.tokens for g in generate_batch(split, prompts(batch), new)]


def decode_rate(run, batch: int, new: int, device: str) -> tuple[float, list]:
    """(decode tokens per second, the tokens) of one measurement: N tokens less 1."""
    one, _ = timed(lambda: run(batch, 1), device)
    full, tokens = timed(lambda: run(batch, new), device)
    return batch * (new - 1) / max(full - one, 1e-9), tokens


def one_rank(args) -> dict:
    theirs = build(args.size, args.dtype, args.device)
    mine = copy.deepcopy(theirs)  # hf_plan switches the model's attention to meshpar's: a copy of its own
    split = meshpar.parallelize(mine, meshpar.ParallelMesh.single(), meshpar.hf_plan(mine)).split
    runs = {"transformers": lambda b, n: transformers_run(theirs, b, n, args.device),
            "meshpar": lambda b, n: meshpar_run(split, b, n)}
    for name, run in runs.items():  # warm-up
        run(1, 4)
    results = {}
    for batch in (1, 8):
        rates = {name: [] for name in runs}
        tokens = {}
        for _ in range(args.reps):
            for name, run in runs.items():  # alternating: noise hits both alike
                rate, tokens[name] = decode_rate(run, batch, args.new_tokens, args.device)
                rates[name].append(rate)
        results[batch] = {name: statistics.median(r) for name, r in rates.items()}
        results[batch]["same_tokens"] = tokens["meshpar"] == tokens["transformers"]
    return results


def tp_rank(rank: int, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    mesh = meshpar.init_mesh(tp=2)
    model = build(args.size, args.dtype, "cpu")
    split = meshpar.parallelize(model, mesh, meshpar.hf_plan(model)).split
    meshpar_run(split, 1, 4)  # warm-up
    rates = [decode_rate(lambda b, n: meshpar_run(split, b, n), 8, args.new_tokens, "cpu")[0]
             for _ in range(args.reps)]
    if rank == 0:
        results.put(statistics.median(rates))
    mesh.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-tp", action="store_true", help="skip the tp2 part (one GPU has one rank)")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    print(f"LlamaForCausalLM {args.size} ({args.dtype}, {args.device}), prompts of {PROMPT_TOKENS} tokens, "
          f"{args.new_tokens} new tokens, median of {args.reps}", flush=True)
    results = one_rank(args)
    for batch, r in results.items():
        print(f"batch {batch}: decode tokens/s  transformers {r['transformers']:9.1f}  meshpar {r['meshpar']:9.1f}  "
              f"ratio {r['meshpar'] / r['transformers']:.3f}  same tokens: {'yes' if r['same_tokens'] else 'NO'}",
              flush=True)
    if not args.no_tp and args.device == "cpu":
        tp2 = run_on_local_ranks(tp_rank, 2, args, 1)[0]
        tp1 = results[8]["meshpar"]
        print(f"batch 8: meshpar decode tokens/s  tp1 {tp1:9.1f}  tp2 {tp2:9.1f}  ratio tp2/tp1 {tp2 / tp1:.3f}")


if __name__ == "__main__":
    main()
