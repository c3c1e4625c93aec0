"""The optimizer step: AdamW parameter groups, the learning-rate schedule and
gradient clipping by the global norm over every rank and shard."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from meshpar import comm
from meshpar.config import TrainConfig
from meshpar.mesh import ParallelMesh
from meshpar.parallel.sharding import shard_spec



def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=(cfg.beta1, cfg.beta2), foreach=True)


def peak_lr(cfg: TrainConfig) -> float:
    """The configured lr, linearly scaled with the global batch if `lr_scale_from` is set
    (Goyal et al. 2017: lr proportional to batch size, from a reference batch B0)."""
    if cfg.lr_scale_from:
        return cfg.lr * cfg.global_batch_size / cfg.lr_scale_from
    return cfg.lr


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to min_lr_ratio * peak by the
    last step. `step` counts from 0."""
    peak = peak_lr(cfg)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = peak * cfg.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def global_grad_norm(params: list[nn.Parameter], mesh: ParallelMesh) -> torch.Tensor:
    """L2 norm of the full model's gradient. Squares of sharded parameters are summed
    across their shard axis (a chunk held by several ranks counted once); replicated
    parameters are counted once; pipeline stages add up."""
    squares_by_axes: dict[tuple[str, ...], torch.Tensor] = defaultdict(lambda: 0.0)
    for p in params:
        if p.grad is not None:
            spec = shard_spec(p)
            axes = (spec.axis,) if spec else ()
            squares = p.grad.detach().float().pow(2).sum() / (spec.replicas if spec else 1)
            squares_by_axes[axes] = squares_by_axes[axes] + squares
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for axes, squares in squares_by_axes.items():
        squares = torch.as_tensor(squares, dtype=torch.float32, device=total.device).clone()
        for axis in axes:
            comm.all_reduce(mesh, axis, squares, tag="grad_norm")
        total += squares
    comm.all_reduce(mesh, "pp", total, tag="grad_norm")  # stages hold disjoint parameters
    return total.sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float, mesh: ParallelMesh) -> float:
    """Scale gradients so their global norm is at most `max_norm` (0: no clipping);
    return the norm before clipping."""
    norm = global_grad_norm(params, mesh)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    return norm.item()
