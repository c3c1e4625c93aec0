"""One-device training speed: meshpar (dp = tp = pp = 1) against a plain PyTorch loop over
the same model, eager and compiled, in one process on one device.

    python benchmarks/gpu_step.py                       # on a GPU: llama-1.4b, micro-batch 8 x 2048, bf16
    python benchmarks/gpu_step.py --device cpu          # anywhere: a toy model, fp32, to check the script

Variants (`--variants`, all by default):
    torch-eager       the plain loop: autocast, F.cross_entropy on the fp32 upcast of the
                      logits, clip_grad_norm_, AdamW (fused on a GPU), the loss read every step
    torch-compile     the same with torch.compile(model)
    meshpar           meshpar's trainer, one rank: the same model, data, schedule and clipping
    meshpar-compile   the same with --compile (each transformer block compiled)

Every variant starts from the same weights and trains on the same batches with the same
learning-rate schedule, so their losses agree to bf16 round-off (printed: a cross-check
that the variants do the same work). The first `--warmup` steps (compilation) are not
timed; the step time is the median of the next `--steps`. With `--rounds R` the variants
take turns R times (fresh model each time) and each reports its median round: on a shared
machine, noise then hits them alike.

One JSON line per variant: tokens/s, TFLOP/s with the issue's count of 6 N + 12 L h s
FLOPs per token (N all parameters) and with the exact matmul count (the input embedding is
a lookup, not a matmul), MFU against the bf16 matmul rate measured here (an 8192^3 matmul
on a GPU) and against 989 TFLOP/s (H100/H200 dense bf16), peak memory. Then one line of
ratios: meshpar / torch-eager and meshpar-compile / torch-compile (at least 1.0: meshpar is
as fast or faster). A variant that fails prints a line with its error, and the others still
run: on a lent machine one run has to say as much as it can.

With `--profile FILE` each variant runs one more step under torch.profiler after the timed
ones: its line gains that step's wall time, and FILE gets the kernels that took the most
device time and the device time of all of them - where a slower variant loses its time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from datetime import date

import torch
import torch.nn.functional as F

from meshpar.config import Config, ModelSection, check
from meshpar.mesh import ParallelMesh
from meshpar.model import build_model
from meshpar.parallel.precision import autocast
from meshpar.planner.hardware import GPUS
from meshpar.planner.model import from_meshpar
from meshpar.data.corpus import load_tokens
from meshpar.data.loader import BatchLoader
from meshpar.train.metrics import peak_memory
from meshpar.train.optim import build_optimizer, lr_at
from meshpar.train.trainer import Trainer

# Each eager pair before the compiled one: a run cut short still has one comparison.
VARIANTS = ("torch-eager", "meshpar", "torch-compile", "meshpar-compile")
H100_BF16_PEAK = GPUS["h100-80gb"].peak_tflops * 1e12  # dense bf16, the same for an H200
# On a CPU: a toy model of the same family, small enough to compile and train in seconds.
TOY = {"vocab_size": 1024, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
       "ffn_hidden_size": 352, "max_seq_len": 128}


def config(args, compile_blocks: bool) -> Config:
    gpu = args.device == "cuda"
    return check(Config(
        model=ModelSection(args.model or ("llama-1.4b" if gpu else "tiny"), {} if gpu or args.model else TOY)).update(
        global_batch_size=args.batch, micro_batch_size=args.batch, seq_len=args.seq_len,
        steps=args.warmup + args.steps, warmup_steps=args.warmup + args.steps, lr=3e-4, device=args.device,
        precision=args.precision, compile=compile_blocks, eval_every=0, progress=False))


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_steps(cfg: Config, device: torch.device, compiled: bool, count: int):
    """The plain PyTorch loop; yields (step time, loss) per step."""
    model = build_model(cfg.model.resolve(), cfg.run.seed, device)
    params = list(model.parameters())
    optimizer = build_optimizer(model, cfg.optimizer, lr_at(0, cfg))  # meshpar's groups: weight decay on matrices only
    forward = torch.compile(model) if compiled else model
    data = cfg.data
    loader = BatchLoader(load_tokens(data.data)[0], data.seq_len, data.global_batch_size, 0, 1, cfg.run.seed)
    for step in range(count):
        x, y = (t.to(device) for t in loader.next_batch())
        synchronize(device)
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast(cfg.precision.precision, device):
            logits = forward(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # synchronises, as meshpar's step does
        yield time.perf_counter() - start, value


def meshpar_steps(cfg: Config, device: torch.device, count: int):
    trainer = Trainer(cfg, ParallelMesh.single(), device)
    for _ in range(count):
        synchronize(device)
        record = trainer.train_step()
        yield record["step_time_s"], record["loss"]


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of one large square matmul: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def profiled_step(steps, name: str, device: torch.device, out: str) -> dict:
    """Run one more step under torch.profiler; append its costliest kernels (and, on a GPU,
    the device time of all of them: the table's "Self CUDA time total") to `out`; return
    the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        next(steps)
        synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    with open(out, "a") as f:
        f.write(f"=== {name}: wall {wall * 1e3:.1f} ms\n")
        f.write(events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                             row_limit=30, max_name_column_width=90))
        f.write("\n")
    return {"profiled_step_wall_s": round(wall, 5)}


def run_variant(name: str, args, device: torch.device, rate: float) -> dict:
    cfg = config(args, compile_blocks=name == "meshpar-compile")
    gc.collect()  # the last variant's model and optimizer, held in reference cycles, out of this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    count = args.warmup + args.steps
    generator = (meshpar_steps(cfg, device, count + 1) if name.startswith("meshpar")
                 else plain_steps(cfg, device, name == "torch-compile", count + 1))
    steps = [next(generator) for _ in range(count)]
    profiled = profiled_step(generator, name, device, args.profile) if args.profile else {}
    generator.close()
    step_time = statistics.median(t for t, _ in steps[args.warmup:])
    tokens_per_s = args.batch * args.seq_len / step_time
    model = cfg.model.resolve()
    issue_flops = 6 * model.num_params() + 12 * model.num_layers * model.hidden_size * args.seq_len
    matmul_flops = from_meshpar(model, args.seq_len).flops_per_token()
    record = {
        "variant": name, "device": device_name(device), "params": model.num_params(),
        "batch": args.batch, "seq_len": args.seq_len, "precision": args.precision,
        "step_time_s": round(step_time, 5), "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(tokens_per_s * issue_flops / 1e12, 3),
        "tflops_matmul_count": round(tokens_per_s * matmul_flops / 1e12, 3),
        "mfu_vs_measured_matmul": round(tokens_per_s * issue_flops / rate, 4),
        "mfu_vs_989": round(tokens_per_s * issue_flops / H100_BF16_PEAK, 4) if device.type == "cuda" else None,
        # On a CPU only the process's peak resident set is known, which earlier variants set.
        "peak_memory_gib": round(peak_memory(device) / 2 ** 30, 2) if device.type == "cuda" else None,
        "compile_and_warmup_s": round(sum(t for t, _ in steps[:args.warmup]), 2),
        "losses": [round(loss, 4) for _, loss in steps],
        **profiled,
    }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def median_round(runs: list[dict]) -> dict:
    """The round of median step time, and every round's step time beside it."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    chosen = dict(sorted(runs, key=lambda r: r["step_time_s"])[len(runs) // 2])
    chosen["step_time_s_per_round"] = [r["step_time_s"] for r in runs]
    # Each round's peak too: on an H200, both torch variants' peaks in a second round were
    # 10.17 GiB above their first round's (the cause not established); the first round's is clean.
    chosen["peak_memory_gib_per_round"] = [r["peak_memory_gib"] for r in runs]
    return chosen


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None):
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if gpu else "cpu")
    parser.add_argument("--model", help="a meshpar preset (default: llama-1.4b on a GPU, a toy model on a CPU)")
    parser.add_argument("--batch", type=int, help="micro-batch = batch (default 8 on a GPU, 2 on a CPU)")
    parser.add_argument("--seq-len", type=int, help="default 2048 on a GPU, 128 on a CPU")
    parser.add_argument("--precision", help="default bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps, compilation included (3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, in turns; report each one's median round (1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--profile", metavar="FILE",
                        help="profile one more step per variant; append its costliest kernels to FILE")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    args.batch = args.batch or (8 if on_gpu else 2)
    args.seq_len = args.seq_len or (2048 if on_gpu else 128)
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if on_gpu and not gpu:
        parser.error("--device cuda, but no CUDA device is visible; use --device cpu")

    device = torch.device(args.device)
    torch.manual_seed(0)
    rate = matmul_rate(device)
    lines = []
    emit({"benchmark": "gpu_step", "date": date.today().isoformat(), "device": device_name(device),
          "torch": torch.__version__, "matmul_tflops": round(rate / 1e12, 2)}, lines, args.out)
    rounds = {name: [] for name in variants}
    for round_index in range(args.rounds):  # variants take turns, so a busy machine slows them alike
        for name in variants:
            try:
                run = run_variant(name, args, device, rate)
            except Exception as error:  # report it and go on to the other variants
                traceback.print_exc(file=sys.stderr)
                run = {"variant": name, "error": f"{type(error).__name__}: {error}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rounds[name].append(run)
            # As each run ends (a run cut short keeps what it measured): with one round the
            # line itself, with several a progress line on stderr.
            if args.rounds == 1:
                emit(run, lines, args.out)
            else:
                print(f"round {round_index + 1}: {json.dumps(run)}", file=sys.stderr, flush=True)
    results = {name: median_round(runs) for name, runs in rounds.items()}
    if args.rounds > 1:
        for result in results.values():
            emit(result, lines, args.out)
    ratios = {f"{ours}/{theirs}": round(results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"], 3)
              for ours, theirs in (("meshpar", "torch-eager"), ("meshpar-compile", "torch-compile"))
              if "tokens_per_s" in results.get(ours, {}) and "tokens_per_s" in results.get(theirs, {})}
    if ratios:
        emit({"tokens_per_s_ratio": ratios}, lines, args.out)
    return lines


def emit(line: dict, lines: list[dict], out: str | None):
    """Print one JSON line, keep it, and append it to `out`."""
    lines.append(line)
    print(json.dumps(line), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
