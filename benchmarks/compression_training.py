"""200 steps of the tiny model at dp=2 with fp32 gradients on the wire, int8 with error
feedback, and int8 without it; prints each run's final training loss (mean of the last
10 steps), its validation loss and the gap to fp32, and draws the three curves.

    python benchmarks/compression_training.py --out docs/img/compression.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from meshpar.train.plot import plot_runs

RUNS = {"fp32": ["--grad-compression", "none"],
        "int8, error feedback": ["--grad-compression", "int8"],
        "int8, no error feedback": ["--grad-compression", "int8", "--no-error-feedback"]}


def train(extra: list[str], args, metrics: Path) -> tuple[list[float], float]:
    subprocess.run([sys.executable, "-m", "meshpar", "train", "--model", "tiny", "--dp", str(args.dp),
                    "--steps", str(args.steps), "--no-progress", "--metrics-file", str(metrics), *extra],
                   check=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "step" in r and "val_loss" not in r]
    val = [r["val_loss"] for r in records if "val_loss" in r and "summary" not in r][-1]
    return losses, val


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="docs/img/compression.png")
    args = parser.parse_args()
    curves, vals = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in RUNS.items():
            curves[label], vals[label] = train(extra, args, Path(tmp) / f"{len(curves)}.jsonl")
    tail = {label: sum(losses[-10:]) / 10 for label, losses in curves.items()}
    for label in RUNS:
        print(json.dumps({"run": label, "dp": args.dp, "steps": args.steps,
                          "final_train_loss_last10": round(tail[label], 4), "val_loss": round(vals[label], 4),
                          "train_gap_to_fp32": round(tail[label] / tail["fp32"] - 1, 4),
                          "val_gap_to_fp32": round(vals[label] / vals["fp32"] - 1, 4)}))
    print("plot:", plot_runs(curves, args.out, f"tiny model, dp={args.dp}: gradients on the wire"))


if __name__ == "__main__":
    main()
