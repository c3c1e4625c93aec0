"""Mixed precision: 16-bit compute, fp32 everywhere else.

Parameters, gradients, their reduction and the optimizer stay in fp32 (the master
weights); `torch.autocast` runs the matmuls in bf16 or fp16. fp16's narrow range needs
dynamic loss scaling (Micikevicius et al. 2018): the loss is multiplied by a scale before
backward and the gradients divided by it after; an Inf or NaN in any gradient on any rank
skips the step on every rank. After `loss_scale_hysteresis` consecutive overflows the
scale is multiplied by `loss_scale_backoff`; after `loss_scale_growth_interval` clean
steps, doubled.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The context that computes in `precision` on `device` (nothing for fp32). `cache`:
    autocast keeps each weight's 16-bit copy until the context ends (off when the copies
    are cast again in backward instead: weight_casts.py)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@dataclass
class PrecisionOptions(Section):
    """Mixed precision: the compute's dtype, and fp16's dynamic loss scale."""

    precision: str = option("fp32", "the compute: fp32, or bf16/fp16 under autocast with fp32 master weights, "
                                    "gradients and optimizer", choices=PRECISIONS)
    loss_scale_initial: float = option(65536.0, "fp16: initial loss scale", positive=True)
    loss_scale_growth_interval: int = option(1000, "fp16: clean steps before the scale doubles", at_least=1)
    loss_scale_backoff: float = option(0.5, "fp16: factor on the scale after overflows, in (0, 1)", positive=True)
    loss_scale_hysteresis: int = option(2, "fp16: consecutive overflows before the scale shrinks", at_least=1)

    def problems(self, cfg: Config) -> list[str]:
        if self.loss_scale_backoff >= 1:
            return [f"--loss-scale-backoff={self.loss_scale_backoff} must be below 1 (it shrinks the scale)"]
        return []


class DynamicLossScaler:
    GROWTH = 2.0

    def __init__(self, cfg: PrecisionOptions):
        self.cfg = cfg
        self.scale = cfg.loss_scale_initial
        self.clean_steps = 0
        self.overflows_left = cfg.loss_scale_hysteresis

    def unscale_and_check(self, grads: list[torch.Tensor], mesh: ParallelMesh) -> bool:
        """Divide the gradients (this rank's, or its shards of them) by the scale; True if
        any gradient on any rank of any axis holds an Inf or NaN (then every rank skips)."""
        torch._foreach_mul_(grads, 1.0 / self.scale)
        bad = torch.zeros((), device=grads[0].device if grads else "cpu")
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        comm.all_reduce(mesh, "world", bad, tag="overflow", op="max")
        return bool(bad.item())

    def unscale_and_update(self, grads: list[torch.Tensor], mesh: ParallelMesh) -> bool:
        """The end of every fp16 step: unscale and check the gradients, then move the
        scale. True: an overflow somewhere, and every rank skips the update."""
        overflow = self.unscale_and_check(grads, mesh)
        self.update(overflow)
        return overflow

    def update(self, overflow: bool):
        if overflow:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale *= self.cfg.loss_scale_backoff
                self.overflows_left = self.cfg.loss_scale_hysteresis
        else:
            self.clean_steps += 1
            self.overflows_left = self.cfg.loss_scale_hysteresis
            if self.clean_steps % self.cfg.loss_scale_growth_interval == 0:
                self.scale *= self.GROWTH

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict):
        self.scale, self.clean_steps, self.overflows_left = state["scale"], state["clean_steps"], state["overflows_left"]
