"""Checkpoints of a model parallelized through the Python API (`Parallelized.save` and
`Parallelized.load`): the trainer's format (store.py) under the model's own parameter
names and full shapes, so what one layout (dp, tp, pp, ZeRO stage) saved loads into any
other.

A fused column parameter (q, k and v in one projection) holds on each tp rank its rows of
each of its k parts, so its local tensor is no box of the full one. It is saved as k
tensors, `name#0` .. `name#k-1`: part j alone, split over tp like any column weight - at
tp = 1 too, where the plan still says it is fused, so every layout names it alike.

Saved: parameters, AdamW's moments and step count, how many steps were taken, fp16's
loss scale, every rank's RNG states (put back when the layout is the same: in another
one, rank i is another rank's successor and the caller reseeds), and `extra` - the
caller's own JSON data, such as its data position or its learning-rate schedule's state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from meshpar.checkpoint.regions import CheckpointError
from meshpar.checkpoint.store import CheckpointReader, write_checkpoint
from meshpar.checkpoint.training import (Part, load_moments, optimizer_state_pieces, read_local, restore_rng,
                                         rng_tensors, saved_parts)


def _parts_of(parallelized) -> Callable[[nn.Parameter], list[Part]]:
    """param -> its saved parts (training.saved_parts), under the model's own names."""
    names = {id(p): name for name, p in parallelized.named_parameters()}
    return lambda p: saved_parts(names[id(p)], p, parallelized.mesh)


def _layout(parallelized) -> dict:
    mesh = parallelized.mesh
    return {"world_size": mesh.world_size, **{axis: mesh.size(axis) for axis in ("pp", "dp", "cp", "tp")},
            "zero": parallelized.data_parallel.stage, "schedule": parallelized.schedule,
            "virtual_stages": parallelized.virtual_stages}


def save(parallelized, directory: str | Path, keep: int = 3, extra: dict | None = None) -> Path:
    """Collective: write checkpoint `step-<steps taken>` under `directory`, with the
    caller's `extra` (JSON; rank 0's is written)."""
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save(extra=...): the caller's data is kept as JSON, and this is not JSON: {err}") from None
    mesh, dp = parallelized.mesh, parallelized.data_parallel
    tensors, pieces = optimizer_state_pieces(dp, parallelized.optimizer, mesh, _parts_of(parallelized))
    tensors.update(rng_tensors(parallelized.device()))
    meta = {"model": {"name": parallelized.model_name, "api": True}, "layout": _layout(parallelized),
            "train": {"step": parallelized.steps_taken,
                      "optimizer_step": parallelized.steps_taken - parallelized.skipped_steps,
                      "skipped_steps": parallelized.skipped_steps,
                      "loss_scaler": parallelized.scaler.state_dict() if parallelized.scaler else None,
                      "extra": extra}}
    return write_checkpoint(directory, parallelized.steps_taken, mesh, tensors, pieces, meta, keep)


def load(parallelized, path: str | Path) -> int:
    """Restore parameters, AdamW's state, the step count, fp16's loss scale, the caller's
    `extra` and (in the same layout) the RNG states from the newest complete checkpoint
    at `path`, saved in any layout; returns the step. Collective: every rank checks
    its share of the files' checksums."""
    reader = CheckpointReader(path)
    reader.verify(parallelized.mesh)
    if reader.meta.get("train") is None:
        raise CheckpointError(f"{reader.path}: holds parameters only, no optimizer state to load")
    dp, parts_of = parallelized.data_parallel, _parts_of(parallelized)
    dp.load_params(lambda p: read_local(reader, "param", parts_of(p)))
    load_moments(dp, parallelized.optimizer, reader, reader.meta["train"]["optimizer_step"], parts_of)
    saved = reader.meta["train"]
    parallelized.steps_taken = saved["step"]
    parallelized.skipped_steps = saved.get("skipped_steps", 0)
    if parallelized.scaler and saved.get("loss_scaler"):  # fp16 resumes at its scale
        parallelized.scaler.load_state_dict(saved["loss_scaler"])
    parallelized.extra = saved.get("extra")
    if reader.meta["layout"] == _layout(parallelized):
        restore_rng(reader.local_state(parallelized.mesh.rank), parallelized.device())
    return parallelized.steps_taken
