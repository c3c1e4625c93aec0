"""`meshpar plan`: read the model, cluster and job from flags, search, print the ranking."""

from __future__ import annotations

import argparse
import json
import sys

from meshpar.parallel.precision import PRECISIONS
from meshpar.planner.hardware import GPUS, load_cluster, make_cluster
from meshpar.planner.layout import SETTINGS
from meshpar.planner.memory import Dtypes
from meshpar.planner.model import ARCHS, PRESETS, ModelSpec, from_hf_config, with_seq_len
from meshpar.planner.search import Candidate, explain, parse_fix, plan

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 2**30


def add_arguments(parser: argparse.ArgumentParser):
    model = parser.add_argument_group("model (a preset, a config.json, or --arch with shapes)")
    model.add_argument("--model", help=f"preset: {', '.join(PRESETS)}")
    model.add_argument("--model-config", help="a Hugging Face config.json (Llama- or GPT-2-style)")
    model.add_argument("--arch", help=f"{' or '.join(ARCHS)}, with the shape flags below")
    for flag in ("--layers", "--hidden", "--heads", "--kv-heads", "--ffn-hidden", "--vocab"):
        model.add_argument(flag, type=int)
    model.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's)")
    model.add_argument("--flash-attention", action="store_true", help="gpt: do not materialize the scores")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    cluster.add_argument("--gpus-per-node", type=int, default=8, help="(default 8)")
    cluster.add_argument("--gpu", default="h100-80gb", help=f"{', '.join(GPUS)} (default h100-80gb)")
    cluster.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak")
    cluster.add_argument("--gpu-memory-gb", type=float, help="override the memory per GPU (GB)")
    cluster.add_argument("--intra-node-gbps", type=float, help="override NVLink GB/s per GPU and direction")
    cluster.add_argument("--inter-node-gbps", type=float, help="override network GB/s per GPU and direction")
    cluster.add_argument("--cluster", help="a cluster file (as `meshpar calibrate` writes) instead of --gpu")
    job = parser.add_argument_group("job")
    job.add_argument("--global-batch-size", type=int, default=1024, help="sequences per step (default 1024)")
    job.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS), help="compute (bf16)")
    job.add_argument("--param-dtype", choices=tuple(DTYPE_BYTES), help="stored parameters (default fp32, "
                     "as meshpar's trainer; bf16 with a separate fp32 master copy as in the ZeRO paper)")
    job.add_argument("--grad-dtype", choices=tuple(DTYPE_BYTES), help="gradients (default fp32)")
    job.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour, for the cost per million tokens")
    out = parser.add_argument_group("output")
    out.add_argument("--fix", help=f"hold settings, e.g. tp=8,pp=16,zero=1; keys: {', '.join(SETTINGS)}")
    out.add_argument("--top", type=int, default=10, help="candidates shown (default 10)")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument("--explain", action="store_true", help="say why the winner beats the runners-up")


def model_from_args(args) -> ModelSpec:
    chosen = [name for name, value in (("--model", args.model), ("--model-config", args.model_config),
                                       ("--arch", args.arch)) if value]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --model, --model-config or --arch" +
                         (f" (got {', '.join(chosen)})" if chosen else ""))
    if args.model:
        if args.model not in PRESETS:
            raise ValueError(f"unknown --model {args.model}; choose one of {', '.join(PRESETS)}")
        spec = PRESETS[args.model]
    elif args.model_config:
        spec = from_hf_config(args.model_config)
    else:
        missing = [f for f in ("layers", "hidden", "heads", "vocab") if getattr(args, f) is None]
        if missing:
            raise ValueError(f"--arch needs {', '.join('--' + m for m in missing)}")
        gpt = args.arch == "gpt"
        spec = ModelSpec(args.arch, args.layers, args.hidden, args.heads, args.kv_heads or args.heads,
                         args.ffn_hidden or (4 * args.hidden if gpt else 8 * args.hidden // 3), args.vocab,
                         args.seq_len or 2048, flash_attention=not gpt or args.flash_attention)
    if args.flash_attention and spec.arch == "gpt":
        spec = ModelSpec(**{**spec.__dict__, "flash_attention": True})
    spec = with_seq_len(spec, args.seq_len)
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return spec


def cluster_from_args(args):
    if args.gpus < 1 or args.gpus_per_node < 1 or args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus} must be a positive multiple of --gpus-per-node {args.gpus_per_node}")
    per_node = min(args.gpus_per_node, args.gpus)
    if args.cluster:
        return load_cluster(args.cluster, args.gpus)
    return make_cluster(args.gpu, args.gpus, per_node, peak_tflops=args.peak_tflops,
                        memory_bytes=args.gpu_memory_gb and args.gpu_memory_gb * 1e9,
                        intra_node_GBps=args.intra_node_gbps, inter_node_GBps=args.inter_node_gbps)


def format_table(candidates: list[Candidate], top: int) -> str:
    header = (f"{'#':>3}  {'layout':<58} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'other':>6} "
              f"{'total':>7}  {'fits':<4} {'step s':>8} {'tokens/s':>11} {'MFU':>6}")
    lines = [header, f"{'':>3}  {'':<58} {'(GiB per GPU)':^51}"]
    for i, c in enumerate(candidates[:top], 1):
        m = c.memory
        lines.append(f"{i:>3}  {c.layout.describe():<58} {m['params'] / GiB:>7.1f} {m['grads'] / GiB:>7.1f} "
                     f"{m['optimizer'] / GiB:>7.1f} {m['activations'] / GiB:>7.1f} {m['other'] / GiB:>6.1f} "
                     f"{m['total'] / GiB:>7.1f}  {'yes' if c.fits else 'no':<4} {c.time['total']:>8.3f} "
                     f"{c.tokens_per_s:>11,.0f} {c.mfu:>6.1%}"
                     + (f"  ${c.cost_per_million_tokens:.2f}/M tokens" if c.cost_per_million_tokens else ""))
    return "\n".join(lines)


def plan_command(args) -> int:
    try:
        spec = model_from_args(args)
        cluster = cluster_from_args(args)
        fixed = parse_fix(args.fix)
        if args.global_batch_size < 1 or args.top < 1:
            raise ValueError("--global-batch-size and --top must be at least 1")
    except ValueError as err:
        print(f"meshpar plan: {err}", file=sys.stderr)
        return 2
    dtypes = Dtypes.for_precision(args.precision, args.param_dtype and DTYPE_BYTES[args.param_dtype],
                                  args.grad_dtype and DTYPE_BYTES[args.grad_dtype])
    candidates = plan(spec, cluster, args.global_batch_size, dtypes, fixed, args.gpu_hour_price)
    if not candidates:
        print(f"meshpar plan: no layout of {spec.layers} layers, {spec.heads} heads and sequence {spec.seq_len} "
              f"divides {cluster.gpus} GPUs ({cluster.gpus_per_node} per node) and a global batch of "
              f"{args.global_batch_size}" + (f" with {args.fix}" if args.fix else ""), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": {**spec.__dict__, "params": spec.params()},
                          "gpus": cluster.gpus, "gpu": cluster.gpu.name,
                          "candidates": [c.to_json() for c in candidates[:args.top]]}, indent=1))
    else:
        moe = (f" ({spec.experts} experts, top-{spec.experts_per_token}: "
               f"{spec.active_params() / 1e9:.1f}B used per token)") if spec.experts else ""
        print(f"{spec.arch} model, {spec.params() / 1e9:.2f}B parameters{moe}, sequence {spec.seq_len}; "
              f"{cluster.gpus} x {cluster.gpu.name} ({cluster.gpus_per_node} per node), global batch "
              f"{args.global_batch_size}; {len(candidates):,} layouts, "
              f"{sum(c.fits for c in candidates):,} fit in {cluster.gpu.memory_bytes / GiB:.1f} GiB")
        print(format_table(candidates, args.top))
        if args.explain:
            print("\n".join(explain(candidates)))
    if not candidates[0].fits:
        closest = candidates[0]
        print(f"meshpar plan: no layout fits in {cluster.gpu.memory_bytes / GiB:.1f} GiB per GPU; the closest, "
              f"{closest.layout.describe()}, needs {closest.memory['total'] / GiB:.1f} GiB "
              f"({(closest.memory['total'] - cluster.gpu.memory_bytes) / GiB:.1f} GiB over)", file=sys.stderr)
        return 1
    return 0
