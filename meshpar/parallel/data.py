"""Data parallelism: gradients live in flat buckets and are all-reduced over `dp`.

Each parameter's `.grad` is a view into one bucket's flat buffer, so a bucket is reduced
with one collective and no copies. Buckets are filled in reverse parameter order, the
order in which backward produces gradients, so that overlapping the reduction with
backward (sharded data-parallel issue) only has to launch the same buckets earlier.

Losses are normalised by the global token count, so the reduction is a plain sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh


@dataclass
class GradBucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor


class DataParallelReducer:
    def __init__(self, params: list[nn.Parameter], mesh: ParallelMesh, bucket_bytes: int):
        self.mesh = mesh
        self.buckets: list[GradBucket] = []
        pending: list[nn.Parameter] = []
        pending_bytes = 0
        for param in reversed([p for p in params if p.requires_grad]):
            pending.append(param)
            pending_bytes += param.numel() * param.element_size()
            if pending_bytes >= bucket_bytes:
                self._add_bucket(pending)
                pending, pending_bytes = [], 0
        if pending:
            self._add_bucket(pending)

    def _add_bucket(self, params: list[nn.Parameter]):
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                             device=params[0].device)
        offset = 0
        for param in params:
            param.grad = buffer[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        self.buckets.append(GradBucket(params, buffer))

    def zero_grad(self):
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def reduce(self):
        """Sum every bucket over the dp axis; call once per step, after the last
        micro-batch's backward (accumulation needs no communication)."""
        for bucket in self.buckets:
            comm.all_reduce(self.mesh, "dp", bucket.buffer, tag="grads")

    def grad_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
