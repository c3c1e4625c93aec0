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


def experts_anywhere(layers: list[MoE], mesh: ParallelMesh) -> bool:
    """Whether any pipeline stage holds MoE layers (one all-reduce over pp; once a run):
    then every rank takes part in `step_statistics`, a stage without layers too."""
    has = torch.tensor([float(bool(layers))])
    comm.all_reduce(mesh, "pp", has, tag="experts", op="max")
    return bool(has.item())


def step_statistics(layers: list[MoE], mesh: ParallelMesh, tokens: int) -> dict:
    """{"aux_loss", "tokens_per_expert": {"min", "mean", "max"}, and with a capacity
    "dropped_tokens"} over every rank. Collective over dp, cp and pp."""
    counts = torch.stack([layer.tokens_per_expert.float() for layer in layers]) if layers else torch.zeros(0, 1)
    aux = sum(float(layer.aux_loss_sum) for layer in layers)
    dropped = sum(float(layer.dropped_tokens) for layer in layers)
    # every rank's tokens: each expert's count in the whole batch, and the sums, in one tensor
    summed = torch.cat([counts.flatten(), torch.tensor([aux, dropped])])
    for axis in ("dp", "cp"):
        comm.all_reduce(mesh, axis, summed, tag="experts")
    counts, aux, dropped = summed[:-2].view_as(counts), summed[-2], summed[-1]
    low = counts.min().reshape(1) if counts.numel() else torch.tensor([torch.inf])
    high = counts.max().reshape(1) if counts.numel() else torch.tensor([-torch.inf])
    capped = float(any(layer.capacity_factor is not None for layer in layers))
    over_stages = torch.tensor([counts.sum().item(), float(counts.numel()), aux.item(), dropped.item(), capped])
    for tensor, op in ((low, "min"), (high, "max"), (over_stages, "sum")):
        comm.all_reduce(mesh, "pp", tensor, tag="experts", op=op)
    total, count, aux, dropped, capped = over_stages.tolist()
    out = {"aux_loss": aux / tokens,
           "tokens_per_expert": {"min": low.item(), "mean": total / count, "max": high.item()}}
    if capped:
        out["dropped_tokens"] = int(dropped)
    return out
