"""The optimizer step: AdamW parameter groups, the learning-rate schedule and
gradient clipping by the global norm over every rank and shard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.options import Section, option
from meshpar.parallel.sharding import is_tied_copy, shard_spec
from meshpar.train.checks import check_finite

if TYPE_CHECKING:
    from meshpar.config import Config
    from meshpar.parallel.zero import ShardedDataParallel



@dataclass
class OptimizerOptions(Section):
    """AdamW (weight decay on matrices, not on vectors) and clipping by the global norm."""

    lr: float = option(3e-3, "peak learning rate", positive=True)
    weight_decay: float = option(0.1, "AdamW weight decay", at_least=0)
    beta1: float = option(0.9, "AdamW's first-moment decay, in [0, 1)", at_least=0)
    beta2: float = option(0.95, "AdamW's second-moment decay, in [0, 1)", at_least=0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: off)", at_least=0)

    def problems(self, cfg: Config) -> list[str]:
        return [f"--{name}={value} must be below 1" for name, value in (("beta1", self.beta1), ("beta2", self.beta2))
                if value >= 1]


@dataclass
class LrScheduleOptions(Section):
    """The learning rate over the run: linear warmup, then cosine decay to a floor."""

    warmup_steps: int = option(20, "linear warmup steps before the cosine decay", at_least=0)
    min_lr_ratio: float = option(0.1, "the cosine decays to lr x this, in [0, 1]", at_least=0)
    lr_scale_from: int | None = option(None, "scale lr linearly by global-batch-size / this reference batch",
                                       at_least=1)

    def problems(self, cfg: Config) -> list[str]:
        return [f"--min-lr-ratio={self.min_lr_ratio} must be at most 1"] if self.min_lr_ratio > 1 else []


def build_optimizer(model: nn.Module, cfg: OptimizerOptions, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw([p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2], cfg, lr)


def adamw(decayed: list[torch.Tensor], undecayed: list[torch.Tensor], cfg: OptimizerOptions,
          lr: float | None = None) -> torch.optim.AdamW:
    """The fused kernel, on GPUs and CPUs alike: one pass over each parameter, no
    temporaries the size of the model (the foreach kernel's sqrt of the second moments
    was one: 60 MiB more at the peak of a 290M-parameter model's tp4 x pp2 rank).
    `lr`: the starting learning rate, default `cfg.lr`."""
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay},
              {"params": undecayed, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr if lr is None else lr,
                             betas=(cfg.beta1, cfg.beta2), fused=True)


def peak_lr(cfg: Config) -> float:
    """The configured lr, linearly scaled with the global batch if `lr_scale_from` is set
    (Goyal et al. 2017: lr proportional to batch size, from a reference batch B0)."""
    if cfg.lr_schedule.lr_scale_from:
        return cfg.optimizer.lr * cfg.data.global_batch_size / cfg.lr_schedule.lr_scale_from
    return cfg.optimizer.lr


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to min_lr_ratio * peak by the
    last step. `step` counts from 0."""
    peak, schedule = peak_lr(cfg), cfg.lr_schedule
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    decay_steps = max(1, cfg.run.steps - schedule.warmup_steps - 1)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    floor = peak * schedule.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def global_grad_norm(pieces: list[tuple[nn.Parameter, torch.Tensor]], mesh: ParallelMesh,
                     sharded_over_dp: bool = False, params: list[nn.Parameter] | None = None) -> torch.Tensor:
    """L2 norm of the full model's gradient, from (parameter, gradient piece) pairs. Squares
    of tp-sharded parameters are summed across their shard axis (a chunk held by several
    ranks counted once); pieces sharded over dp (ZeRO) are summed over dp (experts split over
    ep: over ep, and over edp when sharded); pipeline stages
    add up (a weight two stages share counted on the first). `params`: every parameter this rank's stage holds (default: those of
    `pieces`) - the reductions are chosen from them, so that a ZeRO shard holding no piece
    of some kind (only tp-sharded weights, say) still joins every reduction its peers make."""
    def axes_of(p: nn.Parameter) -> tuple[str, ...]:
        spec = shard_spec(p)
        zero = "edp" if spec and spec.axis == "ep" else "dp"  # experts split over ep are sharded over edp
        return ((spec.axis,) if spec else ()) + ((zero,) if sharded_over_dp else ())

    params = [p for p, _ in pieces] if params is None else params
    pieces = [(p, g) for p, g in pieces if not is_tied_copy(p)]  # its holder counts it
    device = params[0].device if params else (pieces[0][1].device if pieces else "cpu")
    squares_by_axes = {axes: torch.zeros((), dtype=torch.float32, device=device) for axes in map(axes_of, params)}
    # One multi-tensor norm per kind of piece: a single read of the gradients.
    kinds: dict[tuple[tuple[str, ...], int], list[torch.Tensor]] = {}
    for p, grad in pieces:
        spec = shard_spec(p)
        kinds.setdefault((axes_of(p), spec.replicas if spec else 1), []).append(grad.detach())
    for (axes, replicas), grads in kinds.items():
        squares_by_axes[axes] += torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() / replicas
    total = torch.zeros((), dtype=torch.float32, device=device)
    for axes, squares in sorted(squares_by_axes.items(), key=lambda item: item[0]):  # the same order on every rank
        for axis in axes:
            comm.all_reduce(mesh, axis, squares, tag="grad_norm")
        total += squares
    comm.all_reduce(mesh, "pp", total, tag="grad_norm")  # stages hold disjoint parameters
    return total.sqrt()


def clip_by_norm(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float,
                 norm_value: float | None = None) -> float:
    """Scale `grads` so that a global norm `norm` becomes at most `max_norm` (0: no
    clipping); return the norm (`norm_value` when the caller has already read it)."""
    # A norm read on the host and clearly under the limit makes the scale exactly 1: skip
    # the pass over every gradient (two bytes moved per gradient byte) that would change nothing.
    clearly_under = norm_value is not None and norm_value < max_norm * (1 - 1e-3)
    if max_norm > 0 and not clearly_under:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
    return norm.item() if norm_value is None else norm_value


def clip_and_step(dp: ShardedDataParallel, optimizer: torch.optim.Optimizer, mesh: ParallelMesh,
                  max_grad_norm: float, step: int, names: Callable[[], dict[int, str]],
                  find_origin: Callable[[], tuple[int, int, str] | None] | None = None,
                  loss_sum: torch.Tensor | None = None) -> float:
    """The end of a training step, after the gradient reduction: the global gradient
    norm; a DivergenceError on every rank when it or the (reduced) loss is not finite,
    naming step `step` and where it began (`find_origin`: this rank's first non-finite
    module output or input gradient, collective; `names`: parameter id -> name; both
    asked only then); clipping; the optimizer on this rank's shard. Returns the norm."""
    pieces = dp.grad_pieces()
    norm = global_grad_norm(pieces, mesh, sharded_over_dp=dp.grads_sharded, params=dp.params())
    # The norm and the loss reach the host in one read (on a GPU, one synchronisation).
    norm_value, loss = torch.stack([norm, torch.zeros_like(norm) if loss_sum is None
                                    else loss_sum.to(norm.dtype)]).tolist()
    if not (math.isfinite(norm_value) and math.isfinite(loss)):
        origin = find_origin() if find_origin else None
        named = names()
        check_finite(step, loss, norm_value, [(named[id(p)], g) for p, g in dp.grad_pieces()], mesh,
                     dp.produced_nonfinite(), origin)
    clip_by_norm(dp.grads(), norm, max_grad_norm, norm_value)
    dp.step(optimizer)
    return norm_value


def clip_grads(params: list[nn.Parameter], max_norm: float, mesh: ParallelMesh) -> float:
    """Clip replicated (or tp-sharded) parameters' gradients by their global norm; return
    the norm before clipping."""
    pieces = [(p, p.grad) for p in params if p.grad is not None]
    return clip_by_norm([g for _, g in pieces], global_grad_norm(pieces, mesh), max_norm)
