"""Divergence checks: a loss or gradient that is no longer finite, and replicas that
should be identical but are not.

Both raise `DivergenceError` on every rank with the same message (the ranks agree through
a collective first), so a run stops everywhere instead of hanging where one rank left.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.parallel.sharding import model_names, sharded_over, tied_across_stages
from meshpar.train.nonfinite import PHASES


class DivergenceError(RuntimeError):
    """The run can no longer be trusted: what diverged, where, and at which step."""


def check_finite(step: int, loss: float, grad_norm: float, named_grads: list[tuple[str, torch.Tensor]],
                 mesh: ParallelMesh, produced_nonfinite: bool = False,
                 first_seen: tuple[int, int, str] | None = None):
    """Collective when something is wrong (every rank sees the same global loss and norm):
    raise naming the step and where the first non-finite value appeared - the module and
    rank that made it, in the order the computation ran (`first_seen`: this rank's, from
    its NonFiniteWatch) - or, when no module's output or input gradient was ever
    non-finite (a parameter's gradient alone), the first rank whose own gradient was not
    finite before the reduction (`produced_nonfinite`); and the parameters whose reduced
    gradient is not."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    bad = sorted({name for name, grad in named_grads if not torch.isfinite(grad).all()})
    per_rank = comm.all_gather_object(mesh, (produced_nonfinite, bad, first_seen), tag="check")
    origins = [rank for rank, (produced, _, _) in enumerate(per_rank) if produced]
    names = sorted({name for _, names, _ in per_rank for name in names})
    seen = [(first[:2], rank, first) for rank, (_, _, first) in enumerate(per_rank) if first is not None]
    what = (f"parameter {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")) if names \
        else "no gradient: the loss itself is not finite"
    advice = "Lower the learning rate, check the data, or use bf16 instead of fp16."
    if seen:
        _, rank, (phase, _, module) = min(seen)
        raise DivergenceError(f"step {step}: loss {loss}, gradient norm {grad_norm}; the first non-finite value "
                              f"appeared in the {PHASES[phase]} of {module} on rank {rank} "
                              f"({mesh.shape.coords(rank)}); non-finite gradient: {what}. {advice}")
    if origins:
        stage = mesh.shape.coords(origins[0])["pp"]
        names = sorted({name for rank, (_, rank_names, _) in enumerate(per_rank)
                        if mesh.shape.coords(rank)["pp"] == stage for name in rank_names}) or names
        what = f"parameter {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        where = f"first produced on rank {origins[0]} ({mesh.shape.coords(origins[0])})"
    else:
        where = "produced on no rank before the reduction"
    raise DivergenceError(f"step {step}: loss {loss}, gradient norm {grad_norm}; non-finite gradient {where}, "
                          f"{what}. {advice}")


def checksum(tensor: torch.Tensor) -> tuple[int, float]:
    """Exact bits (their integer sum) and the float sum: equal for identical tensors."""
    flat = tensor.detach().contiguous().view(-1)
    bits = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.int16)
    return int(bits.to(torch.int64).sum()), float(flat.double().sum())


def check_replicas(module: nn.Module, mesh: ParallelMesh, step: int):
    """Collective: parameters must be identical across dp and cp, those not sharded over
    tp (norm gains, replicated KV heads) across tp, and a tied embedding on the first and
    the last pipeline stage. Raise naming the first parameter that differs, the axis and
    which ranks hold which value. The parameters must be present (under ZeRO-3, gathered)."""
    named = [(name, p) for name, p in model_names(module) if p.numel() > 0]
    replicated_over = {
        "dp": named,
        "cp": named,
        "tp": [(name, p) for name, p in named if not sharded_over(p, "tp")],
        "pp_ends": [(name, p) for name, p in named if tied_across_stages(p)],  # only the end ranks hold one
    }
    found: str | None = None
    for axis, replicated in replicated_over.items():
        if mesh.size(axis) == 1 or not replicated:
            continue
        sums = [checksum(p) for _, p in replicated]
        everyone = comm.all_gather_object(mesh, sums, tag="check", axis=axis)
        for i, (name, _) in enumerate(replicated):
            values = [rank_sums[i] for rank_sums in everyone]
            if found is None and len(set(values)) > 1:
                groups: dict[tuple, list[int]] = {}
                for rank, value in zip(mesh.ranks(axis), values):
                    groups.setdefault(value, []).append(rank)
                detail = "; ".join(f"ranks {ranks} hold sum {value[1]:.9g}" for value, ranks in groups.items())
                found = f"step {step}: parameter {name} differs across {axis} - {detail}"
    # Only some slices may have found a difference: agree on it everywhere, then stop everywhere.
    found = next((f for f in comm.all_gather_object(mesh, found, tag="check") if f), None)
    if found:
        raise DivergenceError(found)
