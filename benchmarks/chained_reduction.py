"""Time blocked after backward by the dp reduction, for the reductions that are chains of
collectives: the hierarchical all-reduce (4 ranks as 2 nodes x 2) and int8's all-reduce
(2 ranks). The time is `finish_reduction`'s on rank 0 (what the step waits for once
backward has returned), mean over the timed steps, with `--bucket-mb` small enough for
many buckets. Run it on two versions of meshpar to compare them (this machine's loopback
is fast, so the absolute figures are small; the ratio is the point).

    python benchmarks/chained_reduction.py [--steps 8] [--bucket-mb 0.05]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import torch  # noqa: E402
from common import run_on_local_ranks  # noqa: E402
from meshpar.config import Config, ModelSection, check  # noqa: E402
from meshpar.parallel.zero import ShardedDataParallel  # noqa: E402
from meshpar.train.launch import build_mesh  # noqa: E402
from meshpar.train.trainer import Trainer  # noqa: E402

CASES = {"hierarchical, 2 nodes x 2": (4, dict(ranks_per_node=2, hierarchical_allreduce=True)),
         "int8, dp 2": (2, dict(grad_compression="int8"))}


def rank_main(rank: int, args, results):
    world, options = CASES[args.case]
    cfg = check(Config(model=ModelSection("tiny")).update(
        dp=world, global_batch_size=8 * world, seq_len=128, steps=args.steps + 2, eval_every=0, progress=False,
        bucket_mb=args.bucket_mb, **options), env={})
    finish, blocked = ShardedDataParallel.finish_reduction, []

    def timed(self):
        start = time.perf_counter()
        finish(self)
        blocked.append(time.perf_counter() - start)
    ShardedDataParallel.finish_reduction = timed
    trainer = Trainer(cfg, build_mesh(cfg), torch.device("cpu"))
    starts = []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        trainer.train_step()
        starts.append(time.perf_counter() - start)
    if rank == 0:
        timed_blocked, timed_steps = blocked[2:], starts[2:]  # the first two steps warm up
        results.put((sum(timed_blocked) / len(timed_blocked), sum(timed_steps) / len(timed_steps),
                     len(trainer.data_parallel.buckets)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=0.05)
    args = parser.parse_args()
    for case, (world, _) in CASES.items():
        args.case = case
        blocked, step, buckets = run_on_local_ranks(rank_main, world, args, 1)[0]
        print(f"{case}: {buckets} buckets, blocked after backward {blocked * 1e3:.2f} ms of a "
              f"{step * 1e3:.1f} ms step (mean of {args.steps} steps, rank 0)")


if __name__ == "__main__":
    main()
