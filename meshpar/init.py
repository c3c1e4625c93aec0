"""Sharded from the first byte: build on the meta device, then fill only this rank's boxes.

A model is built on the meta device (shapes, no memory), the layout slices it (tensor
parallelism, pipeline stages), and only then does each parameter get this rank's storage,
filled by an initializer or left for a checkpoint to load: in ZeRO's flat buckets during
training (`Materialization`, read by parallel/zero/: under ZeRO-3 only the rank's shard
is drawn), or on its own by `materialize` (a whole one-device model, a rank's share alone).

Initialization is defined tile by tile, so that any box of a parameter can be filled
without the rest. A parameter is cut into tiles (`tile_shape`: 256 x 256 elements for a
matrix, 65,536 for a vector); each tile draws its values from its own generator, seeded
by the run's seed, the parameter's whole-model name and the tile's index. A rank holding
a box of a parameter draws only the tiles the box touches, keeps what falls inside it, and
so holds at any moment its share plus one tile. The one-device model is filled by the same
rule with boxes that are the whole tensors, so every parallel run still starts from
exactly the reference's values.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from meshpar.checkpoint.regions import Box, box_of
from meshpar.mesh import ParallelMesh
from meshpar.parallel.sharding import FUSED_ATTR, model_names, shard_spec

TILE_SIDE = 256  # a matrix's tiles are TILE_SIDE x TILE_SIDE
TILE_VECTOR = 65_536  # a vector's tiles


@dataclass(frozen=True)
class Materialization:
    """How a meta-built model's parameters get storage: on `device`, each rank's boxes of
    them (placed by `mesh`), filled by `fill(tensor, box, name)` - None: left
    uninitialized for a checkpoint to overwrite."""

    device: torch.device | str
    mesh: ParallelMesh
    fill: Callable[[torch.Tensor, Box, str], None] | None


class _SkipInitializers(TorchFunctionMode):
    """Module constructors' own initializers (torch.nn.init.*) do nothing: on the meta
    device there is nothing to fill, and the values they would draw are not the ones the
    run starts from anyway (the rank's share is filled after the split)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules inside this block on the meta device: shapes only, no memory, no
    initializers run."""
    with torch.device("meta"), _SkipInitializers():
        yield


@dataclass(frozen=True)
class InitRule:
    """How one parameter starts: `normal` (mean 0, `std`), `ones` or `zeros`."""

    kind: str
    std: float = 0.0

    def __post_init__(self):
        if self.kind not in ("normal", "ones", "zeros"):
            raise ValueError(f"init rule {self.kind!r}: choose normal, ones or zeros")


def tile_shape(full_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The tile of a tensor of `full_shape`: whole tiles along the last two dimensions,
    one index at a time along the others."""
    if len(full_shape) == 0:
        return ()
    if len(full_shape) == 1:
        return (TILE_VECTOR,)
    return (1,) * (len(full_shape) - 2) + (TILE_SIDE, TILE_SIDE)


def tile_seed(seed: int, name: str, tile: tuple[int, ...]) -> int:
    """A 63-bit seed for one tile of one parameter, the same in every process."""
    key = f"{seed}/{name}/{','.join(map(str, tile))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def fill_normal(out: torch.Tensor, box: Box, name: str, std: float, seed: int) -> None:
    """Write into `out` (the box's local tensor) the box's elements of the parameter
    `name` drawn tile by tile; padding past the full tensor's end is zeroed."""
    out.zero_()
    if box.volume() == 0:
        return
    tile = tile_shape(box.full_shape)
    ranges = []  # per dimension: the tiles the box's valid region touches
    for offset, valid, side in zip(box.offsets, box.valid, tile):
        ranges.append(range(offset // side, (offset + valid - 1) // side + 1))
    for index in itertools.product(*ranges):
        starts = [i * side for i, side in zip(index, tile)]
        extent = tuple(min(side, full - start) for side, full, start in zip(tile, box.full_shape, starts))
        generator = torch.Generator().manual_seed(tile_seed(seed, name, index))
        values = torch.randn(extent, generator=generator, dtype=torch.float32)
        source, target = [], []
        for start, n, offset, valid in zip(starts, extent, box.offsets, box.valid):
            lo, hi = max(start, offset), min(start + n, offset + valid)
            source.append(slice(lo - start, hi - start))
            target.append(slice(lo - offset, hi - offset))
        out[tuple(target)] = (values[tuple(source)] * std).to(out.dtype)


def fill(out: torch.Tensor, box: Box, name: str, rule: InitRule, seed: int) -> None:
    """`out` := the box `box` of parameter `name` initialized by `rule`."""
    with torch.no_grad():
        if rule.kind == "normal":
            fill_normal(out, box, name, rule.std, seed)
            return
        out.zero_()
        if rule.kind == "ones":
            valid = tuple(slice(0, v) for v in box.valid)
            out[valid] = 1.0


def initializer(rule_of: Callable[[str], InitRule], seed: int) -> Callable[[torch.Tensor, Box, str], None]:
    """A `fill` for `materialize`: each parameter by `rule_of(its name)` from `seed`."""
    def fill_parameter(out: torch.Tensor, box: Box, name: str) -> None:
        fill(out, box, name, rule_of(name), seed)
    return fill_parameter


def boxes_of(param: torch.Tensor, mesh: ParallelMesh | None) -> list[tuple[slice, Box]]:
    """Where `param`'s local rows lie in the full parameter: (its local rows, their box).
    One box, or one per part of a fused column parameter (q, k and v in one projection:
    a rank holds its rows of each part, which are no one box of the whole)."""
    if mesh is None:
        return [(slice(None), Box.whole(param.shape))]
    parts = getattr(param, FUSED_ATTR, 1)
    if parts == 1:
        return [(slice(None), box_of(param, mesh))]
    spec, rows, rest = shard_spec(param), param.shape[0] // parts, tuple(param.shape[1:])
    full_rows = spec.full_size if spec else param.shape[0]
    index = mesh.index(spec.axis) if spec else 0
    zeros = (0,) * len(rest)
    return [(slice(j * rows, (j + 1) * rows),
             Box((full_rows,) + rest, (j * full_rows // parts + index * rows,) + zeros, (rows,) + rest, (rows,) + rest))
            for j in range(parts)]


def _rows_of(box: Box, first: int, stop: int) -> Box:
    """The box of rows [first, stop) of a local tensor whose box is `box`."""
    valid = max(0, min(box.valid[0] - first, stop - first))
    return Box(box.full_shape, (box.offsets[0] + first, *box.offsets[1:]), (valid, *box.valid[1:]),
               (stop - first, *box.local_shape[1:]))


def fill_flat(out: torch.Tensor, param: torch.Tensor, mesh: ParallelMesh | None, name: str, start: int,
              fill_parameter: Callable[[torch.Tensor, Box, str], None]) -> None:
    """`out` (1-d) := elements [start, start + out.numel()) of `param`'s local tensor,
    flattened row-major, as `materialize` would fill them - drawing only the rows they
    touch. ZeRO fills this rank's flat range of a bucket this way (zero.py)."""
    shape = tuple(param.shape)
    if not shape:
        value = torch.empty((), dtype=out.dtype, device=out.device)
        fill_parameter(value, Box.whole(()), name)
        out.copy_(value.reshape(1)[start:start + out.numel()])
        return
    row = max(1, param[0].numel()) if shape[0] else 1
    first, stop = start // row, -(-(start + out.numel()) // row)
    rows = torch.empty((stop - first, *shape[1:]), dtype=out.dtype, device=out.device)
    for local, box in boxes_of(param, mesh):
        lo, hi, _ = local.indices(shape[0])
        a, b = max(lo, first), min(hi, stop)
        if a < b:
            fill_parameter(rows[a - first:b - first], _rows_of(box, a - lo, b - lo), name)
    skip = start - first * row
    out.copy_(rows.reshape(-1)[skip:skip + out.numel()])


def adopt_storage(param: nn.Parameter, storage: torch.Tensor) -> None:
    """Make the meta parameter `param` a real one over `storage` (a tensor of its shape,
    often a view of a larger buffer), in place: the same Parameter object, so whatever
    holds it - tied modules, tensor-parallel bookkeeping - keeps holding it; its
    attributes (shard spec, tie marks) stay."""
    real = nn.Parameter(storage, requires_grad=param.requires_grad)
    real.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, real)


def move_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Every buffer of `module` onto `device`; one still on the meta device is an error
    (nothing could fill it)."""
    for owner in module.modules():
        for key, buffer in owner._buffers.items():
            if buffer is None:
                continue
            if buffer.is_meta:
                raise ValueError(f"buffer {type(owner).__name__}.{key} is on the meta device and no rule "
                                 f"fills it; compute it on a real device in the model's constructor")
            owner._buffers[key] = buffer.to(device)


def materialize(module: nn.Module, mesh: ParallelMesh | None, device: torch.device | str,
                fill_parameter: Callable[[torch.Tensor, Box, str], None] | None) -> int:
    """Give every meta parameter of `module` storage of its own on `device`, in place
    (`adopt_storage`), filled by `fill_parameter(tensor, its box, whole-model name)` or
    left uninitialized for a checkpoint to load when it is None. Buffers move to
    `device`; a buffer still on the meta device is an error (nothing could fill it).
    `mesh` places the sliced parameters' boxes (None: a whole model, nothing sliced).
    Returns the bytes allocated for parameters."""
    allocated = 0
    seen: set[int] = set()
    for name, param in model_names(module):
        if id(param) in seen or not param.is_meta:
            continue
        seen.add(id(param))
        adopt_storage(param, torch.empty(param.shape, dtype=param.dtype, device=device))
        allocated += param.numel() * param.element_size()
        if fill_parameter is not None:
            for rows, box in boxes_of(param, mesh):
                fill_parameter(param.data[rows], box, name)
    move_buffers(module, device)
    return allocated
