"""Offload: the optimizer's step in host memory.

`optimizer` keeps an fp32 master copy of this rank's shard, its gradient and the
optimizer states in host memory and runs the step there; `params` (ZeRO-3) keeps the
parameter shards themselves in host memory between uses (the buckets put them there),
and their master copy is then the shard itself.
"""

from __future__ import annotations

import torch

from meshpar.parallel.zero.buckets import Bucket


class HostOffload:
    """Each bucket's master shard and gradient in host memory (pinned where a GPU can
    copy from it asynchronously)."""

    def __init__(self, buckets: list[Bucket], stage: int):
        pin = torch.cuda.is_available()
        self.master: dict[int, torch.Tensor] = {}
        self.grad: dict[int, torch.Tensor] = {}
        for b in buckets:
            on_host = b.param_shard.device.type == "cpu" and stage == 3  # ZeRO-3's shard offloaded itself
            master = b.param_shard if on_host else b.param_shard.detach().to("cpu", copy=True)
            self.master[b.index] = master.pin_memory() if pin and not master.is_pinned() else master
            self.grad[b.index] = torch.zeros(b.param_shard.numel(), dtype=b.param_shard.dtype, pin_memory=pin)

    def before_step(self, b: Bucket, reduced_grad: torch.Tensor) -> None:
        self.grad[b.index].copy_(reduced_grad)

    def after_step(self, b: Bucket) -> None:
        """The updated master back into the shard the device computes with."""
        if self.master[b.index] is not b.param_shard:
            b.param_shard.copy_(self.master[b.index])
