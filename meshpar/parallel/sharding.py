"""How a local parameter relates to the full one, and how to gather it back.

Every parallel rewrite that slices a parameter attaches a `ShardSpec` to it. The global
gradient norm, the full-state gather and (later) checkpoints all read the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh

SPEC_ATTR = "meshpar_shard"
TIED_ATTR = "meshpar_tied"  # "holder" or "copy": a weight held by two pipeline stages
TIED_NAME_ATTR = "meshpar_tied_name"  # its name in the whole model
FUSED_ATTR = "meshpar_fused_chunks"  # a column parameter's k fused parts (q, k, v in one projection)


@dataclass(frozen=True)
class ShardSpec:
    """The full tensor is cat([local tensor of rank sources[0], ..., sources[k-1]], dim)
    cut to full_size along `dim` (the tail beyond it is padding). Each index along
    `axis` appears in `sources` at most once; chunks held by several ranks (replicas)
    appear once, from their first holder."""

    axis: str
    dim: int
    full_size: int
    sources: tuple[int, ...]
    replicas: int = 1  # how many ranks of the axis hold each chunk

    @staticmethod
    def even(axis: str, dim: int, full_size: int, num_shards: int) -> ShardSpec:
        return ShardSpec(axis, dim, full_size, tuple(range(num_shards)))


def shard_spec(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, SPEC_ATTR, None)


def sharded_over(param: torch.Tensor, axis: str) -> bool:
    """Whether `param` holds a different slice of the full tensor on each rank of `axis`
    (not a replica)."""
    spec = shard_spec(param)
    return spec is not None and spec.axis == axis


def tie(param: nn.Parameter, role: str, name: str) -> None:
    """Mark `param` as one of the two copies of a weight that the first and the last
    pipeline stage both use (a tied embedding): "holder" on the first stage, "copy" on
    the last; `name` is the whole model's name for it (the copy's module calls it
    otherwise). Their gradients are summed over `pp_ends`; the holder alone counts in the
    gradient norm and writes checkpoints."""
    if role not in ("holder", "copy"):
        raise ValueError(f"tie role {role!r}: choose holder or copy")
    setattr(param, TIED_ATTR, role)
    setattr(param, TIED_NAME_ATTR, name)


def tied_across_stages(param: torch.Tensor) -> bool:
    return getattr(param, TIED_ATTR, None) is not None


def is_tied_copy(param: torch.Tensor) -> bool:
    return getattr(param, TIED_ATTR, None) == "copy"


def model_names(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for each parameter `module` holds, named as the whole model
    names it: a tied weight's copy under its holder's name."""
    return [(getattr(p, TIED_NAME_ATTR, name), p) for name, p in module.named_parameters()]


def gather_full(local: torch.Tensor, spec: ShardSpec | None, mesh: ParallelMesh) -> torch.Tensor:
    """The full tensor from every rank's `local` (collective over spec.axis)."""
    if spec is None:
        return local.detach().clone()
    n = mesh.size(spec.axis)
    local = local.detach().movedim(spec.dim, 0).contiguous()
    pieces = comm.all_gather(mesh, spec.axis, local, tag="gather_full").chunk(n)
    full = torch.cat([pieces[src] for src in spec.sources])[:spec.full_size]
    return full.movedim(0, spec.dim).contiguous()


def gather_fused(full_chunks: torch.Tensor, parts: int, tp: int) -> torch.Tensor:
    """Undo a fused column split: the ranks' locals, concatenated in rank order, back into
    [part 0 of every rank, part 1 of every rank, ...]."""
    per_rank = full_chunks.chunk(tp)
    return torch.cat([rank_local.chunk(parts)[k] for k in range(parts) for rank_local in per_rank])


def full_state(model: nn.Module, mesh: ParallelMesh, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) at full shape, on every rank of the shard axes,
    named as the whole model names it; a fused parameter's parts put back in order."""
    out = {}
    for name, param in model_names(model):
        tensor = param.grad if grads else param
        if tensor is not None:
            full = gather_full(tensor, shard_spec(param), mesh)
            parts = getattr(param, FUSED_ATTR, 1)
            out[name] = gather_fused(full, parts, mesh.size("tp")) if parts > 1 else full
    return out
