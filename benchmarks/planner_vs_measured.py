"""The planner's predicted step times against measured ones: 14 layouts of the small
model on 8 local ranks, trained for a few steps each; the cluster is this machine as
`meshpar calibrate` measured it. Prints one JSON line per layout (predicted and measured
seconds, and their ranks) and the Spearman rank correlation.

    meshpar calibrate --ranks 8 --out runs/cluster-cpu8.json
    python benchmarks/planner_vs_measured.py --cluster runs/cluster-cpu8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ranks, spearman
from meshpar.planner.hardware import load_cluster
from meshpar.planner.layout import Layout
from meshpar.planner.memory import Dtypes
from meshpar.planner.model import PRESETS, with_seq_len
from meshpar.planner.search import evaluate

GLOBAL_BATCH, SEQ = 16, 128
# (dp, tp, pp, cp, zero, schedule, virtual stages, micro-batch, sequence parallel, recompute)
LAYOUTS = [
    (8, 1, 1, 1, 0, "none", 1, 2, False, "none"),
    (8, 1, 1, 1, 3, "none", 1, 2, False, "none"),
    (8, 1, 1, 1, 0, "none", 1, 2, False, "full"),
    (4, 2, 1, 1, 1, "none", 1, 4, True, "none"),
    (2, 4, 1, 1, 1, "none", 1, 8, True, "none"),
    (1, 8, 1, 1, 0, "none", 1, 16, True, "none"),
    (4, 1, 2, 1, 0, "1f1b", 1, 1, False, "none"),
    (2, 1, 4, 1, 0, "1f1b", 1, 2, False, "none"),
    (1, 1, 8, 1, 0, "1f1b", 1, 2, False, "none"),
    (2, 2, 2, 1, 1, "1f1b", 1, 2, False, "none"),
    (4, 1, 1, 2, 0, "none", 1, 4, False, "none"),
    (2, 1, 1, 4, 0, "none", 1, 8, False, "none"),
    (2, 1, 4, 1, 0, "zb-h1", 1, 2, False, "none"),
    (1, 2, 4, 1, 0, "interleaved-1f1b", 2, 2, True, "none"),
]


def measure(row, steps: int, metrics: Path) -> float:
    dp, tp, pp, cp, zero, schedule, v, mbs, sp, recompute = row
    argv = [sys.executable, "-m", "meshpar", "train", "--model", "small", "--dp", str(dp), "--tp", str(tp),
            "--pp", str(pp), "--cp", str(cp), "--zero", str(zero), "--micro-batch-size", str(mbs),
            "--recompute", recompute, "--global-batch-size", str(GLOBAL_BATCH), "--seq-len", str(SEQ),
            "--steps", str(steps), "--eval-batches", "1", "--no-progress", "--metrics-file", str(metrics)]
    if pp > 1:
        argv += ["--schedule", schedule, "--virtual-stages", str(v)]
    if sp:
        argv.append("--sequence-parallel")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return statistics.median(times[1:])  # the first step warms up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True, help="the file `meshpar calibrate` wrote")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cluster = load_cluster(args.cluster, gpus=8)
    spec = with_seq_len(PRESETS["small"], SEQ)
    predicted, measured = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(LAYOUTS):
            layout = Layout(*row[:8], row[8], row[9], "none")
            predicted.append(evaluate(spec, layout, cluster, GLOBAL_BATCH, Dtypes.for_precision("fp32")).time["total"])
            measured.append(measure(row, args.steps, Path(tmp) / f"{i}.jsonl"))
            print(json.dumps({"layout": layout.describe(), "predicted_s": round(predicted[-1], 4),
                              "measured_s": round(measured[-1], 4)}), flush=True)
    print(json.dumps({"layouts": len(LAYOUTS), "spearman": round(spearman(predicted, measured), 3),
                      "predicted_rank": ranks(predicted), "measured_rank": ranks(measured)}))


if __name__ == "__main__":
    main()
