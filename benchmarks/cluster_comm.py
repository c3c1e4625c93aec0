"""Communication where the network is the bottleneck: the small model on an emulated
cluster of 2 hosts x 4 ranks whose links run at 100 Mbit/s (`meshpar cluster`; needs
root, `ip` and `tc`), one layout after another:

    flat vs hierarchical all-reduce, fp32 vs bf16 vs int8 gradients, overlap on and off,
    ZeRO-1 vs ZeRO-3, tensor parallelism inside a host vs across hosts, and PyTorch's own
    DistributedDataParallel and FSDP2 on the same hosts and link.

For each: the median step time (steps after the first two), the bytes that left each host
per step (the switch's port counters, read as each step's metrics line appears: every
frame, headers included), and the planner's prediction for the same layout from a cluster
file `meshpar calibrate --emulated-cluster` measured on these hosts. Then the ratios the
issue asks for - each scheme against flat fp32 in time and in bytes, tp across against tp
inside, meshpar's fastest data-parallel configuration against DDP and FSDP2 - and the
planner's accuracy: measured over predicted per layout, the share within 25%, Spearman's
rank correlation of the two orders.

    python benchmarks/cluster_comm.py                 # ~20 minutes on 2 cores
    python benchmarks/cluster_comm.py --link 100mbit --steps 6 --only flat,int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import spearman
from meshpar.cluster import emulated
from meshpar.planner.hardware import load_cluster
from meshpar.planner.layout import Layout
from meshpar.planner.memory import Dtypes
from meshpar.planner.model import PRESETS, with_seq_len
from meshpar.planner.search import evaluate

ROOT = Path(__file__).resolve().parent.parent
MODEL, SEQ, GLOBAL_BATCH = "small", 64, 8
TRAIN = ["--model", MODEL, "--seq-len", str(SEQ), "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "1",
         "--eval-every", "0", "--eval-batches", "1", "--no-progress"]
DP8 = Layout(dp=8, tp=1, pp=1, cp=1, zero=0, schedule="none", virtual_stages=1, micro_batch_size=1,
             sequence_parallel=False, recompute="none", offload="none")

# name -> (meshpar train flags or a torch worker, `cluster run` placement, the planner's layout)
CASES = {
    "flat": (["--dp", "8"], "consecutive", DP8),
    "hierarchical": (["--dp", "8", "--hierarchical-allreduce"], "consecutive", replace(DP8, hierarchical=True)),
    "bf16": (["--dp", "8", "--grad-compression", "bf16"], "consecutive", replace(DP8, grad_compression="bf16")),
    "int8": (["--dp", "8", "--grad-compression", "int8"], "consecutive", replace(DP8, grad_compression="int8")),
    "hierarchical-bf16": (["--dp", "8", "--hierarchical-allreduce", "--grad-compression", "bf16"], "consecutive",
                          replace(DP8, hierarchical=True, grad_compression="bf16")),
    "no-overlap": (["--dp", "8", "--no-overlap"], "consecutive", replace(DP8, overlap=False)),
    "zero1": (["--dp", "8", "--zero", "1"], "consecutive", replace(DP8, zero=1)),
    "zero3": (["--dp", "8", "--zero", "3"], "consecutive", replace(DP8, zero=3)),
    "tp-inside": (["--dp", "4", "--tp", "2"], "consecutive", replace(DP8, dp=4, tp=2)),
    "tp-across": (["--dp", "4", "--tp", "2"], "round-robin", replace(DP8, dp=4, tp=2, tp_across_nodes=True)),
    # 8x the tokens per sequence: the activations tp exchanges outweigh the gradients dp reduces
    "tp-inside-512": (["--dp", "4", "--tp", "2", "--seq-len", "512"], "consecutive", replace(DP8, dp=4, tp=2)),
    "tp-across-512": (["--dp", "4", "--tp", "2", "--seq-len", "512"], "round-robin",
                      replace(DP8, dp=4, tp=2, tp_across_nodes=True)),
    "ddp": (["ddp"], "consecutive", None),
    "fsdp2": (["fsdp2"], "consecutive", None),
}
DATA_PARALLEL = ("flat", "hierarchical", "bf16", "int8", "hierarchical-bf16", "no-overlap", "zero1", "zero3")


def link_bytes(state: emulated.ClusterState) -> list[int]:
    """Bytes each host has sent over its link so far (its port on the switch received them)."""
    out = subprocess.run(["ip", "-n", state.switch, "-s", "-j", "link"], capture_output=True, text=True,
                         check=True).stdout
    ports = {entry["ifname"]: entry["stats64"]["rx"]["bytes"] for entry in json.loads(out)}
    return [ports[state.port(i)] for i in range(state.nodes)]


def measure(state: emulated.ClusterState, state_path: Path, flags: list[str], placement: str, steps: int,
            metrics: Path, port: int) -> dict:
    if flags[0] in ("ddp", "fsdp2"):
        command = [sys.executable, str(ROOT / "benchmarks" / "cluster_torch.py"), "--wrap", flags[0], "--model", MODEL,
                   "--seq-len", str(SEQ), "--global-batch-size", str(GLOBAL_BATCH), "--steps", str(steps)]
    else:
        command = ["meshpar", "train", *TRAIN, *flags, "--steps", str(steps)]
    argv = [sys.executable, "-m", "meshpar", "cluster", "--state", str(state_path), "run", "--port", str(port),
            "--placement", placement, "--", *command, "--metrics-file", str(metrics)]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    at_step: dict[int, list[int]] = {}
    while run.poll() is None:  # the counters as each step's line appears
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        done = [json.loads(line)["step"] for line in lines if '"step_time_s"' in line]
        for step in done:
            at_step.setdefault(step, link_bytes(state))
        time.sleep(0.02)
    err = run.stderr.read()
    if run.returncode:
        raise SystemExit(f"{' '.join(flags)} failed (exit {run.returncode}):\n{err[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r][2:]
    first, last = 2, max(at_step)
    per_step = [(b - a) / (last - first) for a, b in zip(at_step[first], at_step[last])]
    timed = [r for r in records if "step_time_s" in r][2:]
    split = {key: statistics.median(r[key] for r in timed) for key in ("compute_s", "comm_s") if key in timed[0]}
    return {"step_s": statistics.median(times), "host_bytes_per_step": max(per_step), **split,
            "losses": [r["loss"] for r in records if "step_time_s" in r]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", default="100mbit", help="each host's link (default 100mbit)")
    parser.add_argument("--steps", type=int, default=8, help="steps per layout; the first two are not timed")
    parser.add_argument("--only", help=f"comma-separated cases of {', '.join(CASES)}")
    parser.add_argument("--cluster-file", help="a cluster file from an earlier calibration (default: calibrate now)")
    parser.add_argument("--prefix", default="mpbench", help="the emulated hosts' namespace prefix")
    parser.add_argument("--out", default="runs/bench/cluster_comm.json",
                        help="where the measurements and the calibrated cluster go (JSON)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CASES)
    unknown = set(names) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / "cluster.json"
        state = emulated.up(2, 4, emulated.Link.parse(args.link), state_path, prefix=args.prefix)
        try:
            cluster_file = args.cluster_file or str(Path(tmp) / "emulated.json")
            if not args.cluster_file:
                subprocess.run([sys.executable, "-m", "meshpar", "calibrate", "--ranks", "8", "--model", MODEL,
                                "--seq-len", str(SEQ), "--micro-batch-size", "1", "--emulated-cluster",
                                str(state_path), "--out", cluster_file], check=True, cwd=ROOT)
            cluster = load_cluster(cluster_file)
            results = {}
            for i, name in enumerate(names):
                flags, placement, layout = CASES[name]
                measured = measure(state, state_path, flags, placement, args.steps, Path(tmp) / f"{name}.jsonl",
                                   29700 + i)
                if layout is not None:
                    seq = int(flags[flags.index("--seq-len") + 1]) if "--seq-len" in flags else SEQ
                    spec = with_seq_len(PRESETS[MODEL], seq)
                    predicted = evaluate(spec, layout, cluster, GLOBAL_BATCH, Dtypes.for_precision("fp32")).time
                    measured["predicted_s"] = predicted["total"]
                    measured["predicted_parts_s"] = {k: round(v, 4) for k, v in predicted.items() if v}
                results[name] = measured
                print(json.dumps({"case": name, "step_s": round(measured["step_s"], 3),
                                  **{k: round(measured[k], 3) for k in ("compute_s", "comm_s") if k in measured},
                                  "host_MB_per_step": round(measured["host_bytes_per_step"] / 1e6, 2),
                                  **({"predicted_s": round(measured["predicted_s"], 3),
                                      "measured_over_predicted": round(measured["step_s"] / measured["predicted_s"], 3),
                                      "predicted_parts_s": measured["predicted_parts_s"]}
                                     if "predicted_s" in measured else {})}), flush=True)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"link": args.link, "steps": args.steps, "results": results,
                                       "cluster": json.loads(Path(cluster_file).read_text())}, indent=1))
        finally:
            emulated.down(state_path)
    summarize(results)


def summarize(results: dict) -> None:
    flat = results.get("flat")
    if flat:
        for name in ("hierarchical", "bf16", "int8", "hierarchical-bf16", "no-overlap", "zero1", "zero3"):
            if name in results:
                r = results[name]
                print(json.dumps({"vs_flat": name, "time_speedup": round(flat["step_s"] / r["step_s"], 3),
                                  "bytes_factor": round(flat["host_bytes_per_step"] / r["host_bytes_per_step"], 3)}))
    for suffix in ("", "-512"):
        if f"tp-inside{suffix}" in results and f"tp-across{suffix}" in results:
            inside, across = results[f"tp-inside{suffix}"], results[f"tp-across{suffix}"]
            print(json.dumps({"tp_across_over_inside": round(across["step_s"] / inside["step_s"], 3),
                              "seq_len": 512 if suffix else SEQ,
                              "predicted": round(across["predicted_s"] / inside["predicted_s"], 3),
                              "bytes_factor": round(across["host_bytes_per_step"] / inside["host_bytes_per_step"], 3)}))
    ours = {n: results[n]["step_s"] for n in DATA_PARALLEL if n in results}
    if ours:
        best = min(ours, key=ours.get)
        for theirs in ("ddp", "fsdp2"):
            if theirs in results:
                print(json.dumps({"fastest_meshpar_dp": best, "vs": theirs,
                                  "meshpar_over_torch": round(ours[best] / results[theirs]["step_s"], 3)}))
    planned = [r for r in results.values() if "predicted_s" in r]
    if len(planned) >= 2:
        within = sum(abs(r["step_s"] / r["predicted_s"] - 1) <= 0.25 for r in planned)
        print(json.dumps({"planner_layouts": len(planned), "within_25_percent": within,
                          "spearman": round(spearman([r["predicted_s"] for r in planned],
                                                     [r["step_s"] for r in planned]), 3)}))


if __name__ == "__main__":
    main()
