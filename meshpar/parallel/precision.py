"""Mixed precision: 16-bit compute, fp32 everywhere else.

Parameters, gradients, their reduction and the optimizer stay in fp32 (the master
weights); `torch.autocast` runs the matmuls in bf16 or fp16. fp16's narrow range needs
dynamic loss scaling (Micikevicius et al. 2018): the loss is multiplied by a scale before
backward and the gradients divided by it after; an Inf or NaN in any gradient on any rank
skips the step on every rank. After `hysteresis` consecutive overflows the scale is
multiplied by `backoff_factor`; after `growth_interval` clean steps, by `growth_factor`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from meshpar import comm
from meshpar.mesh import ParallelMesh

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The context that computes in `precision` on `device` (nothing for fp32). `cache`:
    autocast keeps each weight's 16-bit copy until the context ends (off when the copies
    are cast again in backward instead: weight_casts.py)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@dataclass
class LossScaleConfig:
    initial_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000  # clean steps before the scale grows
    hysteresis: int = 2  # consecutive overflows before the scale shrinks


class DynamicLossScaler:
    def __init__(self, cfg: LossScaleConfig):
        self.cfg = cfg
        self.scale = cfg.initial_scale
        self.clean_steps = 0
        self.overflows_left = cfg.hysteresis

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
                self.scale *= self.cfg.backoff_factor
                self.overflows_left = self.cfg.hysteresis
        else:
            self.clean_steps += 1
            self.overflows_left = self.cfg.hysteresis
            if self.clean_steps % self.cfg.growth_interval == 0:
                self.scale *= self.cfg.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict):
        self.scale, self.clean_steps, self.overflows_left = state["scale"], state["clean_steps"], state["overflows_left"]
