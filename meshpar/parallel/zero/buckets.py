"""The flat buckets: which parameters share one, and the buffers that hold them.

A bucket is a run of consecutive units (the embedding, each transformer layer, the final
norm, the output layer), taken in reverse order - the order in which backward finishes
them - and closed at `bucket_bytes`; under ZeRO-3 a bucket is exactly one unit, the
granularity at which parameters are gathered. A weight two units share, as tied
embeddings do, lies in the bucket of the later one; a weight tied across pipeline stages
gets a bucket of its own, laid out alike on both ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from meshpar.init import adopt_storage
from meshpar.parallel.sharding import sharded_over, tied_across_stages

if TYPE_CHECKING:
    from meshpar.mesh import ParallelMesh
    from meshpar.parallel.grad_reduce import GradReducer


def units_of(module: nn.Module) -> list[nn.Module]:
    """The modules holding parameters, in forward order: direct children, with module
    lists and dicts (the layers) opened one level, and a child that holds such a list but
    no parameter of its own (transformers' inner `model`, around its layers) opened in
    turn - as one unit it would hold every layer's weights at once."""
    units = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += [m for m in child.children() if any(True for _ in m.parameters())]
        elif not any(True for _ in child.parameters()):
            continue
        elif _holds_layers(child) and not any(True for _ in child.parameters(recurse=False)):
            units += units_of(child)
        else:
            units.append(child)
    return units


def _holds_layers(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) for m in module.modules())


def group_parameters(units: list[nn.Module], bucket_bytes: int, one_unit_each: bool) -> list[list[nn.Parameter]]:
    """The parameters of each bucket, backward order: units from the last, closed at
    `bucket_bytes` (or after every unit); a weight tied across stages in one of its own,
    and experts split over ep apart from the rest (their gradients reduce over edp)."""
    groups: list[list[nn.Parameter]] = []
    seen: set[int] = set()

    def close(units: list[nn.Module], only: list[nn.Parameter] | None = None):
        params = []
        for unit in units:
            for p in (only if only is not None else unit.parameters()):
                if p.requires_grad and id(p) not in seen:  # a tied weight belongs to one bucket
                    seen.add(id(p))
                    params.append(p)
        # experts split over ep reduce over edp, the rest over dp: buckets of their own
        for part in ([p for p in params if not sharded_over(p, "ep")], [p for p in params if sharded_over(p, "ep")]):
            if part:
                groups.append(part)

    pending: list[nn.Module] = []
    pending_bytes = 0
    for unit in reversed(units):
        tied = [p for p in unit.parameters() if tied_across_stages(p) and id(p) not in seen]
        if tied:
            if pending:
                close(pending)
            close([unit], only=tied)
            pending, pending_bytes = [], 0
        pending.insert(0, unit)
        pending_bytes += sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) not in seen)
        if one_unit_each or pending_bytes >= bucket_bytes:
            close(pending)
            pending, pending_bytes = [], 0
    if pending:
        close(pending)
    return groups


@dataclass
class Bucket:
    """Some parameters in one flat buffer, this rank's shard of it, and its gradients.
    Each parameter (and its `.grad`, at stages 0-1) is a view into the buffers."""

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # padded to the reduction's alignment (a multiple of the dp size when sharded)
    shard: tuple[int, int]  # this rank's [start, end) of the flat buffer
    param_flat: torch.Tensor  # full parameters; under ZeRO-3 allocated only while gathered
    param_shard: torch.Tensor  # this rank's slice: a view of param_flat, or its own (ZeRO-3)
    grad_flat: torch.Tensor | None = None  # full gradients; stages 2-3 hold it from backward to its reduction
    grad_shard: torch.Tensor | None = None  # stages 2-3: this rank's reduced gradient
    # Where it is data parallel: the mesh itself, or for experts split over ep the mesh seen
    # with edp as its dp (mesh.data_parallel_over), and the reducer over that.
    mesh: ParallelMesh | None = None
    reducer: GradReducer | None = None

    def owned(self):
        """(parameter, slice of this rank's shard) for each parameter overlapping the shard."""
        lo_shard, hi_shard = self.shard
        for p, offset in zip(self.params, self.offsets):
            lo, hi = max(offset, lo_shard), min(offset + p.numel(), hi_shard)
            if lo < hi:
                yield p, slice(lo - lo_shard, hi - lo_shard)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    @property
    def used(self) -> int:
        """Elements before the alignment padding."""
        return self.offsets[-1] + self.params[-1].numel()


def allocate(index: int, params: list[nn.Parameter], *, align: int, ranks: int, rank: int, stage: int,
             device: torch.device | None, shard_home: str | torch.device | None,
             fill: Callable[[torch.Tensor, nn.Parameter, int], None], direct: bool) -> Bucket:
    """A bucket of `params`: the flat buffer (their storage from now on), the shard of
    `rank` of `ranks` (its own tensor at `shard_home` under ZeRO-3), and the gradient
    buffers its stage keeps. A parameter built on the meta device gets its storage here
    and its values from `fill(out, p, start)` (under ZeRO-3 its shard's elements only);
    `device` is where such parameters live."""
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    sharded = stage >= 1
    numel = -(-total // align) * align
    size = numel // ranks if sharded else numel
    start = rank * size if sharded else 0
    first = params[0]
    meta = first.is_meta
    device = device if meta else first.device
    # On meta, the buffer is left untouched (no resident pages) until filled: under
    # ZeRO-3 only the shard is, and the buffer is freed before any gather.
    param_flat = (torch.empty if meta else torch.zeros)(numel, dtype=first.dtype, device=device)
    with torch.no_grad():
        param_flat[total:].zero_()  # the alignment padding
        for p, offset in zip(params, offsets):
            view = param_flat[offset:offset + p.numel()].view_as(p)
            if p.is_meta:
                adopt_storage(p, view)
                if stage < 3:
                    fill(view.reshape(-1), p, 0)
            else:
                view.copy_(p.detach())
                p.data = view
    param_shard = param_flat[start:start + size]
    if stage == 3:
        home = shard_home or device
        if meta:
            param_shard = torch.zeros(size, dtype=first.dtype, device=home)
            for p, offset in zip(params, offsets):
                lo, hi = max(offset, start), min(offset + p.numel(), start + size)
                if lo < hi:
                    fill(param_shard[lo - start:hi - start], p, lo - offset)
        else:
            param_shard = param_shard.clone().to(home)
        if shard_home == "cpu" and torch.cuda.is_available():
            param_shard = param_shard.pin_memory()
    bucket = Bucket(index, params, offsets, numel, (start, start + size), param_flat, param_shard)
    if direct:
        pass  # the gradients stay autograd's
    elif stage <= 1:
        bucket.grad_flat = torch.zeros_like(param_flat)
        for i, p in enumerate(params):
            p.grad = bucket.view(bucket.grad_flat, i)
    else:
        bucket.grad_shard = torch.zeros_like(param_shard, device=first.device)
    return bucket
