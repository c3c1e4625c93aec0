"""Shared pieces of the tests: a small, fast config and a function that trains it on
whatever mesh the config asks for (on every rank of a World, or in-process)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from meshpar.config import Config, ModelSection, check
from meshpar.train.launch import build_mesh
from meshpar.train.trainer import Trainer


def fast_config(dp: int = 1, steps: int = 20, tp: int = 1, sequence_parallel: bool = False,
                model: dict | None = None, **train) -> Config:
    """The tiny model on short sequences: a 20-step run takes about a second per rank."""
    cfg = Config(model=ModelSection("tiny", dict(model or {}))).update(
        dp=dp, tp=tp, sequence_parallel=sequence_parallel, global_batch_size=16, seq_len=64, steps=steps,
        warmup_steps=5, eval_every=0, eval_batches=1, progress=False)
    return cfg.update(**train)


@contextmanager
def trainer_on_this_rank(cfg: Config, device: str = "cpu", host_staging: bool = False) -> Iterator[Trainer]:
    """A Trainer for `cfg` on this rank; its mesh's groups destroyed on leaving.
    `host_staging`: every collective on host copies, as gloo with CUDA tensors runs."""
    check(cfg)
    mesh = build_mesh(cfg)
    mesh.host_staging = host_staging
    try:
        yield Trainer(cfg, mesh, torch.device(device))
    finally:
        gc.collect()  # the trainer's hooks hold tensors in reference cycles; free them with the groups
        mesh.destroy()  # a world runs hundreds of layouts: do not keep every one's groups and threads


def train_and_report(cfg: Config, device: str = "cpu", host_staging: bool = False) -> dict:
    """Train `cfg` on this rank; what a test compares against the reference."""
    with trainer_on_this_rank(cfg, device, host_staging) as trainer:
        result = trainer.run()
        return {
            "losses": [s["loss"] for s in result.steps],
            "grad_norms": [s["grad_norm"] for s in result.steps],  # None where no update ran (async, step 1)
            "val_loss": result.summary.get("val_loss"),  # none when nothing was left to train
            "params": {name: value.cpu() for name, value in result.parallel.full_state().items()},  # full shape
            "ledger": dict(trainer.mesh.ledger.entries),
            "summary": result.summary,
        }
