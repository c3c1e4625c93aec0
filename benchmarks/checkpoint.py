"""Saving and loading a checkpoint: meshpar's sharded, atomic, checksummed save beside a
plain `torch.save` of the very same tensors by each rank (no atomicity, no checksum, no
fsync - the floor), then loading in the same layout and in another one.

Trains the model two steps at dp=2 x tp=2 x pp=2 ZeRO-1 on 8 local ranks, so that the
optimizer holds its moments, then per round: meshpar save, plain save, meshpar load
(same layout). A second world of 8 ranks at dp=8 ZeRO-3 loads the checkpoint (another
layout: each rank cuts its flat ranges out of the saved boxes), with the files'
checksums checked collectively (each file by one rank, as the trainer does) and, to
compare, by each rank for every file it reads. Times are the median over rounds of the
slowest rank; bytes are what lies on disk, and the sha256 bytes of the busiest rank.

    python benchmarks/checkpoint.py --model small --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import run_on_local_ranks
from meshpar.checkpoint import CheckpointReader, latest_checkpoint
from meshpar.checkpoint.training import rank_tensors, restore_state
from meshpar.config import Config, ModelSection, check
from meshpar.train.launch import build_mesh
from meshpar.train.trainer import Trainer


def config(args, save_dir: str, **parallel) -> Config:
    return check(Config(model=ModelSection(args.model)).update(
        **parallel, global_batch_size=16, micro_batch_size=2, seq_len=128, steps=10, eval_every=0, progress=False,
        save_dir=save_dir))


def slowest(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def save_side(rank: int, args, results):
    cfg = config(args, args.dir, dp=2, tp=2, pp=2, zero=1)
    trainer = Trainer(cfg, build_mesh(cfg), torch.device("cpu"))
    for _ in range(2):
        trainer.train_step()
    plain = Path(args.dir) / "plain"
    plain.mkdir(exist_ok=True)
    times = {"meshpar save": [], "plain torch.save": [], "meshpar load, same layout": []}
    for _ in range(args.rounds):
        times["meshpar save"].append(timed(trainer.save_checkpoint))
        times["plain torch.save"].append(timed(lambda: torch.save(rank_tensors(trainer.parallel)[0],
                                                                  plain / f"rank-{rank}.pt")))
        times["meshpar load, same layout"].append(timed(lambda: load(trainer, args.dir, shared=True)))
    if rank == 0:
        results.put({name: statistics.median(t) for name, t in times.items()})


def load(trainer, directory: str, shared: bool) -> int:
    """Resume `trainer` from the checkpoint; the bytes this rank hashed. `shared`: the
    checksums checked collectively first (the trainer's way), each file on one rank;
    else each rank checks every file it reads from."""
    reader = CheckpointReader(latest_checkpoint(directory))
    if shared:
        reader.verify(trainer.mesh)
    restore_state(trainer.parallel, reader, "")
    return reader.hashed_bytes


def load_side(rank: int, args, results):
    cfg = config(args, args.dir, dp=8, zero=3)
    trainer = Trainer(cfg, build_mesh(cfg), torch.device("cpu"))
    out = {}
    for shared, label in ((True, "checksums shared out"), (False, "each rank checks what it reads")):
        seconds, hashed = [], []
        for _ in range(args.rounds):
            seconds.append(timed(lambda: hashed.append(load(trainer, args.dir, shared))))
        most = torch.tensor(hashed[-1])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out[f"meshpar load, dp=8 ZeRO-3, {label}"] = statistics.median(seconds)
        out[f"sha256 bytes on the busiest rank, {label}"] = int(most)
    if rank == 0:
        results.put(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.dir = tempfile.mkdtemp(prefix="meshpar-ckpt-bench-")
    try:
        times = run_on_local_ranks(save_side, 8, args, 1)[0]
        times.update(run_on_local_ranks(load_side, 8, args, 1)[0])
        checkpoint = latest_checkpoint(args.dir)
        on_disk = sum(f.stat().st_size for f in checkpoint.iterdir())
        plain = sum(f.stat().st_size for f in (Path(args.dir) / "plain").iterdir())
        model_params = Config(model=ModelSection(args.model)).model.resolve().num_params()
        hashed = {name: times.pop(name) for name in list(times) if name.startswith("sha256")}
        for name, seconds in times.items():
            print(json.dumps({"what": name, "seconds": round(seconds, 4),
                              "vs plain torch.save": round(seconds / times["plain torch.save"], 2)}))
        print(json.dumps(hashed))
        print(json.dumps({"model": args.model, "parameters": model_params,
                          "model state bytes (params + 2 moments, fp32)": 12 * model_params,
                          "meshpar bytes on disk": on_disk, "plain torch.save bytes": plain,
                          "files": len(list(checkpoint.glob("*.safetensors"))), "cpus": os.cpu_count()}))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
