"""A model whose eight full fp32 copies could not exist on this machine, trained on 8 ranks.

About 0.8B parameters (hidden 2048, 16 layers, 16 heads, 8 KV heads, ffn 6144): eight
fp32 copies, one per rank as every rank built before meta construction, are 25.8 GB on a
24 GB machine. Here each rank of tp2 x pp2 x dp2 with ZeRO-3 allocates and draws only its
shard, and the run trains 2 steps. Reported: every rank's peak resident memory (the
summary's gather) and the largest as the kernel counts it for the finished ranks, their
sum (not one moment's total: each rank peaks at its own time, and each counts the pages
of the libraries it maps), and the losses.

    python benchmarks/large_model.py                 # about 5 minutes on 2 cores
    python benchmarks/large_model.py --layers 4      # a smaller check of the same path
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "large.toml"
        config.write_text(f"""
[model]
name = "tiny"
hidden_size = 2048
num_layers = {args.layers}
num_heads = 16
num_kv_heads = 8
ffn_hidden_size = 6144
max_seq_len = 64

[mesh]
tp = 2
pp = 2
dp = 2

[zero]
stage = 3

[data]
global_batch_size = 2
micro_batch_size = 1
seq_len = 32

[run]
steps = {args.steps}
eval_every = 0
progress = false

[lr_schedule]
warmup_steps = 1

[optimizer]
lr = 3e-4
""")
        metrics = Path(tmp) / "metrics.jsonl"
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "meshpar", "train", "--config", str(config),
                              "--metrics-file", str(metrics)], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            sys.exit(out.returncode)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = next(r for r in records if r.get("summary"))
    losses = [r["loss"] for r in records if "loss" in r and not r.get("summary")]
    peaks = summary["peak_memory_bytes_per_rank"]
    params = summary["num_params"]
    result = {"benchmark": "large_model", "params": params, "layout": "tp2 x pp2 x dp2, ZeRO-3",
              "eight_fp32_copies_gb": round(8 * 4 * params / GB, 1),
              "peak_rss_per_rank_gb": [round(p / GB, 3) for p in peaks],
              "peak_rss_total_gb": round(sum(peaks) / GB, 2),
              "largest_rank_kernel_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB, 3),
              "losses": losses, "seconds": round(seconds, 1)}
    print(json.dumps(result))
    print(f"{params:,} parameters (8 fp32 copies: {result['eight_fp32_copies_gb']} GB) trained {len(losses)} steps on "
          f"8 ranks in {result['seconds']} s: peak resident {min(result['peak_rss_per_rank_gb'])}-"
          f"{max(result['peak_rss_per_rank_gb'])} GB per rank, {result['peak_rss_total_gb']} GB summed over the ranks' "
          f"own peaks")


if __name__ == "__main__":
    main()
