"""Checkpoints of a model parallelized through the Python API (`Parallelized.save` and
`Parallelized.load`): the trainer's format (store.py) under the model's own parameter
names and full shapes, so what one layout (dp, tp, pp, ZeRO stage) saved loads into any
other.

A fused column parameter (q, k and v in one projection) holds on each tp rank its rows of
each of its k parts, so its local tensor is no box of the full one. It is saved as k
tensors, `name#0` .. `name#k-1`: part j alone, split over tp like any column weight - at
tp = 1 too, where the plan still says it is fused, so every layout names it alike.

Saved: parameters, AdamW's moments and step count, and how many steps were taken. Not
saved: the learning rate (the caller schedules it), RNG states, the caller's data position.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from meshpar.checkpoint.regions import Box, CheckpointError
from meshpar.checkpoint.store import CheckpointReader, write_checkpoint
from meshpar.checkpoint.training import MOMENTS, Part, optimizer_state_pieces, whole
from meshpar.parallel.sharding import shard_spec


def _parts(name: str, p: nn.Parameter, fused: int, mesh) -> list[Part]:
    if fused == 1:
        return whole(name, p, mesh)
    spec = shard_spec(p)
    rows, rest = p.shape[0] // fused, tuple(p.shape[1:])
    index = mesh.index(spec.axis) if spec else 0
    full_rows = spec.full_size // fused if spec else rows
    box = Box((full_rows,) + rest, (index * rows,) + (0,) * len(rest), (rows,) + rest, (rows,) + rest)
    return [Part(f"{name}#{j}", box, j * (p.numel() // fused), p.numel() // fused) for j in range(fused)]


def _fused_counts(parallelized) -> dict[str, int]:
    """Parameter name -> fused parts, from the plan's column patterns."""
    columns = {pattern: k for pattern, k in parallelized.plan.columns().items() if k > 1}
    counts = {}
    for name, _ in parallelized.module.named_parameters():
        module = name.rpartition(".")[0]
        counts[name] = next((k for pattern, k in columns.items() if fnmatch.fnmatchcase(module, pattern)), 1)
    return counts


def _layout(parallelized) -> dict:
    mesh = parallelized.mesh
    return {"world_size": mesh.world_size, **{axis: mesh.size(axis) for axis in ("pp", "dp", "cp", "tp")},
            "zero": parallelized.data_parallel.stage, "schedule": parallelized.schedule}


def save(parallelized, directory: str | Path, keep: int = 3) -> Path:
    """Collective: write checkpoint `step-<steps taken>` under `directory`."""
    mesh, dp, optimizer = parallelized.mesh, parallelized.data_parallel, parallelized.optimizer
    names = {id(p): name for name, p in parallelized.module.named_parameters()}
    fused = _fused_counts(parallelized)
    tensors, pieces = optimizer_state_pieces(dp, optimizer, mesh,
                                             lambda p: _parts(names[id(p)], p, fused[names[id(p)]], mesh))
    meta = {"model": {"name": type(parallelized.module).__name__, "api": True}, "layout": _layout(parallelized),
            "train": {"step": parallelized.steps_taken, "optimizer_step": parallelized.steps_taken}}
    return write_checkpoint(directory, parallelized.steps_taken, mesh, tensors, pieces, meta, keep)


def _local(reader: CheckpointReader, name: str, kind: str, p: nn.Parameter, fused: int, mesh) -> torch.Tensor:
    """This rank's whole local tensor of parameter `name` (flattened), part by part."""
    values = [reader.read(part.name, kind, part.box).reshape(-1) for part in _parts(name, p, fused, mesh)]
    return torch.cat(values)


def load(parallelized, path: str | Path) -> int:
    """Restore parameters, AdamW's state and the step count from the newest complete
    checkpoint at `path`, saved in any layout; returns the step. Collective only in
    that every rank reads."""
    reader = CheckpointReader(path)
    if reader.meta.get("train") is None:
        raise CheckpointError(f"{reader.path}: holds parameters only, no optimizer state to load")
    mesh, dp, optimizer = parallelized.mesh, parallelized.data_parallel, parallelized.optimizer
    names = {id(p): name for name, p in parallelized.module.named_parameters()}
    fused = _fused_counts(parallelized)
    dp.load_params(lambda p: _local(reader, names[id(p)], "param", p, fused[names[id(p)]], mesh))
    step = reader.meta["train"]["optimizer_step"]
    if step > 0:
        group = optimizer.param_groups[0]
        step_on_device = group.get("fused") or group.get("capturable")  # where AdamW keeps its step
        for piece in dp.optimizer_pieces:
            name = names[id(piece.param)]
            state = {"step": torch.tensor(float(step), device=piece.leaf.device if step_on_device else "cpu")}
            for kind in MOMENTS:
                values = _local(reader, name, kind, piece.param, fused[name], mesh)[piece.start:piece.stop]
                state[kind] = torch.empty_like(piece.leaf).copy_(values)
            optimizer.state[piece.leaf] = state
    parallelized.steps_taken = reader.meta["train"]["step"]
    return parallelized.steps_taken
