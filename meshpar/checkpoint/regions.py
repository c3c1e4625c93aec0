"""Where a rank's local tensors sit inside the full (single-device) tensors.

A parameter's local tensor is a box of the full tensor - tp cuts one dimension, padded
at the end where the cut is uneven - and under ZeRO 1-3 a rank owns only the flat range
[start, stop) of that box's row-major elements. A checkpoint records each saved piece as
(full name, box, flat range); a loader in any other layout cuts its own boxes and ranges
out of them. Nothing here needs a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshpar.mesh import ParallelMesh
from meshpar.parallel.sharding import ShardSpec, is_tied_copy, shard_spec


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit this run."""


@dataclass(frozen=True)
class Box:
    """A local tensor's place in the full tensor: per dimension the offset of its first
    element and how many of its elements are real (the rest is padding)."""

    full_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    valid: tuple[int, ...]
    local_shape: tuple[int, ...]

    @staticmethod
    def whole(shape) -> Box:
        shape = tuple(shape)
        return Box(shape, (0,) * len(shape), shape, shape)

    def to_json(self) -> dict:
        return {"full_shape": list(self.full_shape), "offsets": list(self.offsets),
                "valid": list(self.valid), "local_shape": list(self.local_shape)}

    @staticmethod
    def from_json(raw: dict) -> Box:
        return Box(*(tuple(raw[k]) for k in ("full_shape", "offsets", "valid", "local_shape")))

    def overlap(self, other: Box) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(slices into self's local tensor, slices into other's) of the elements both
        hold for real, or None if they share none."""
        mine, theirs = [], []
        for o1, v1, o2, v2 in zip(self.offsets, self.valid, other.offsets, other.valid):
            lo, hi = max(o1, o2), min(o1 + v1, o2 + v2)
            if lo >= hi:
                return None
            mine.append(slice(lo - o1, hi - o1))
            theirs.append(slice(lo - o2, hi - o2))
        return tuple(mine), tuple(theirs)

    def volume(self) -> int:
        return int(torch.tensor(self.valid).prod()) if self.valid else 1


def chunk_index(spec: ShardSpec, index: int) -> int:
    """Which chunk of the full tensor rank `index` of spec.axis holds: its own, or as a
    replica the one of the nearest first holder before it."""
    return max(i for i, source in enumerate(spec.sources) if source <= index)


def box_of(param: nn.Parameter, mesh: ParallelMesh) -> Box:
    """The box of the full tensor that this rank's `param` holds."""
    spec = shard_spec(param)
    local = tuple(param.shape)
    if spec is None:
        return Box.whole(local)
    chunk = local[spec.dim]
    offset = chunk_index(spec, mesh.index(spec.axis)) * chunk
    full = local[:spec.dim] + (spec.full_size,) + local[spec.dim + 1:]
    offsets = tuple(offset if d == spec.dim else 0 for d in range(len(local)))
    valid = tuple(max(0, min(chunk, spec.full_size - offset)) if d == spec.dim else n for d, n in enumerate(local))
    return Box(full, offsets, valid, local)


def first_holder(param: nn.Parameter, mesh: ParallelMesh) -> bool:
    """Whether this rank is the one that saves its box (replicas over tp and cp, and the
    last stage's copy of a tied embedding, skip; replicas over dp are the caller's)."""
    spec = shard_spec(param)
    if mesh.index("cp") != 0 or is_tied_copy(param):
        return False
    if spec is None:
        return mesh.index("tp") == 0
    # split over tp: the chunk's first holder; split over another axis (experts over ep): tp's replicas skip
    return mesh.index(spec.axis) in spec.sources and (spec.axis == "tp" or mesh.index("tp") == 0)


def fill_box(target: Box, sources: list[tuple[Box, torch.Tensor]], name: str) -> torch.Tensor:
    """The local tensor of `target` (padding zero), copied from whole source boxes;
    CheckpointError if the sources do not cover every real element."""
    out = torch.zeros(target.local_shape, dtype=sources[0][1].dtype if sources else torch.float32)
    covered = 0
    for box, values in sources:
        cut = target.overlap(box)
        if cut is not None:
            mine, theirs = cut
            out[mine] = values.reshape(box.local_shape)[theirs]
            covered += int(torch.tensor([s.stop - s.start for s in mine]).prod()) if mine else 1
    if covered != target.volume():
        raise CheckpointError(f"the checkpoint holds {covered} of the {target.volume()} elements of "
                              f"{name} this rank needs (offsets {target.offsets}, shape {target.valid})")
    return out
