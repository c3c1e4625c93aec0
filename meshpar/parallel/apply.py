"""parallelize(): the one place where the parallelisms are composed, in a fixed order.

    1. tensor (and sequence) parallelism: shard the layers over tp
    2. data parallelism happens in the trainer's reducer, over dp

The model arrives as the full, seeded single-device reference and leaves holding only
this rank's slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshpar.mesh import ParallelMesh
from meshpar.model.llama import Transformer
from meshpar.parallel.sharding import full_state
from meshpar.parallel.tensor_plan import TensorParallelLlama


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


@dataclass
class ParallelModel:
    """This rank's part of the model and what training it needs besides forward."""

    module: nn.Module
    mesh: ParallelMesh
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy_sum
    grad_syncs: list[Callable[[], None]] = field(default_factory=list)  # after backward, before dp

    def sync_grads(self):
        for sync in self.grad_syncs:
            sync()

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Parameters (or gradients) gathered back to full shape (collective over tp)."""
        return full_state(self.module, self.mesh, grads)


def parallelize(model: Transformer, mesh: ParallelMesh, sequence_parallel: bool = False) -> ParallelModel:
    parallel = ParallelModel(model, mesh)
    if mesh.size("tp") > 1:
        tp = TensorParallelLlama(model, mesh, sequence_parallel)
        parallel.loss_sum = tp.loss
        parallel.grad_syncs.append(tp.sync_grads)
    return parallel
