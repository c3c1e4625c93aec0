"""A step's mixture-of-experts bookkeeping: each MoE layer told the weight the training
loss gives a token (its load-balancing loss's gradient takes the same), and after the
step the layers' statistics over every rank - the load-balancing loss (in the training
loss's units, summed over layers), the tokens each expert received (min, mean and max
over every layer's experts, counting each (token, choice) pair), and - with a capacity
factor - the pairs dropped (summed over layers)."""

from __future__ import annotations

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.model.moe import MoE


def moe_layers(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def begin_step(layers: list[MoE], loss_scale: float, tokens: int) -> None:
    """Before a step's forwards: its statistics cleared, each token's loss weight set."""
    for layer in layers:
        layer.reset_statistics()
        layer.loss_normalizer = loss_scale / tokens


def step_statistics(layers: list[MoE], mesh: ParallelMesh, tokens: int) -> dict | None:
    """{"aux_loss", "tokens_per_expert": {"min", "mean", "max"}} over every rank, or None
    without experts anywhere. Collective over dp, cp and pp."""
    local = torch.stack([layer.tokens_per_expert.float() for layer in layers]) if layers else None
    has = torch.tensor([float(bool(layers))])
    comm.all_reduce(mesh, "pp", has, tag="experts", op="max")
    if not has.item():
        return None
    aux = torch.stack([layer.aux_loss_sum for layer in layers]).sum().reshape(1) if layers else torch.zeros(1)
    dropped = torch.tensor([float(sum(int(layer.dropped_tokens) for layer in layers))])
    capped = torch.tensor([float(any(layer.capacity_factor is not None for layer in layers))])
    counts = local if local is not None else torch.zeros(0, 1)
    for axis in ("dp", "cp"):  # every rank's tokens: each expert's count in the whole batch
        comm.all_reduce(mesh, axis, counts, tag="experts")
        comm.all_reduce(mesh, axis, aux, tag="experts")
        comm.all_reduce(mesh, axis, dropped, tag="experts")
    inf = torch.tensor([torch.inf])
    low = counts.min().reshape(1) if counts.numel() else inf
    high = counts.max().reshape(1) if counts.numel() else -inf
    total = torch.tensor([counts.sum().item(), float(counts.numel())])
    for axis, tensor, op in (("pp", low, "min"), ("pp", high, "max"), ("pp", total, "sum"), ("pp", aux, "sum"),
                             ("pp", dropped, "sum"), ("pp", capped, "max")):
        comm.all_reduce(mesh, axis, tensor, tag="experts", op=op)
    out = {"aux_loss": aux.item() / tokens,
           "tokens_per_expert": {"min": low.item(), "mean": (total[0] / total[1]).item(), "max": high.item()}}
    if capped.item():
        out["dropped_tokens"] = int(dropped.item())
    return out
