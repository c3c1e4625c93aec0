"""One training step, for every layout and both front doors: `meshpar train` (trainer.py)
and the Python API's `Parallelized.step` run this.

    forward and backward of each micro-batch (a pipeline runs its schedule instead),
    the gradient reduction over dp (ZeRO 0-3, started from backward hooks) finished,
    the loss summed over dp, cp and pp (the last stage holds it),
    fp16: gradients unscaled, and on an overflow anywhere every rank skips the update,
    the global gradient norm, clipping and the optimizer on this rank's shard.

Each micro-batch's summed token loss is divided by the tokens of the whole global batch,
so the parts add up, over micro-batches and dp ranks, to its mean.

The asynchronous schedule (PipeDream-2BW) steps differently: `asynchronous` below.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.parallel.precision import DynamicLossScaler
from meshpar.parallel.zero import ShardedDataParallel
from meshpar.pipeline.runtime import PipelineRuntime
from meshpar.train.activations import count_saved_bytes
from meshpar.train.experts import begin_step, experts_anywhere, moe_layers, step_statistics
from meshpar.train.nonfinite import NonFiniteWatch
from meshpar.train.optim import clip_and_step


@dataclass
class StepResult:
    loss: torch.Tensor  # the global batch's mean loss, on every rank
    grad_norm: float | None  # before clipping; None when the update was skipped
    skipped: bool  # fp16: the gradients overflowed somewhere, nothing was updated
    experts: dict | None = None  # a mixture of experts' statistics (train/experts.py)


@dataclass
class TrainingStep:
    """What a step needs; `pipeline` is set once it exists (pp above 1)."""

    module: nn.Module
    mesh: ParallelMesh
    data_parallel: ShardedDataParallel
    optimizer: torch.optim.Optimizer
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # logits, targets -> summed token loss
    forward: Callable[[torch.Tensor], torch.Tensor]  # a micro-batch's tokens -> its logits
    compute: Callable[[], AbstractContextManager]  # autocast of the chosen precision
    saved_tensor_hooks: Callable[[], AbstractContextManager]  # 16-bit weight copies recast in backward
    max_grad_norm: float
    names: Callable[[], dict[int, str]]  # parameter id -> whole-model name, for a divergence's report
    watch: Callable[[], NonFiniteWatch]  # hooks that find where a non-finite value first appeared
    scaler: DynamicLossScaler | None = None
    pipeline: PipelineRuntime | None = None
    moe: list[nn.Module] = field(default_factory=list)  # the mixture-of-experts layers this rank holds
    experts_anywhere: bool | None = None  # whether any stage holds some (asked on the first step)

    def __post_init__(self):
        self.moe = self.moe or moe_layers(self.module)

    def __call__(self, xs: list[torch.Tensor], ys: list[torch.Tensor], tokens: int, step: int,
                 on_saved: Callable[[int], None] | None = None) -> StepResult:
        """One optimizer step on this rank's micro-batches `xs`, `ys` of a global batch of
        `tokens` target tokens; `step` numbers it (from 1) for a divergence's report.
        `on_saved`: told the bytes each micro-batch saved for backward (no pipeline)."""
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if xs[0].is_cuda else None)
        loss = self._forward_backward(xs, ys, tokens, on_saved)
        if self.experts_anywhere is None:
            self.experts_anywhere = experts_anywhere(self.moe, self.mesh)
        experts = step_statistics(self.moe, self.mesh, tokens) if self.experts_anywhere else None
        if self.scaler and self.scaler.unscale_and_update(self.data_parallel.grads(), self.mesh):
            return StepResult(loss, None, skipped=True, experts=experts)  # parameters and states as they were
        norm = clip_and_step(self.data_parallel, self.optimizer, self.mesh, self.max_grad_norm, step, self.names,
                             lambda: self._replay_watched(xs, ys, tokens, rng), loss)
        return StepResult(loss, norm, skipped=False, experts=experts)

    def _replay_watched(self, xs, ys, tokens: int, rng) -> tuple[int, int, str] | None:
        """A step diverged: run its forward and backward again, from the same random
        state, with every module watched (meshpar/train/nonfinite.py); this rank's first
        non-finite value. Collective, as the step was: every rank saw the divergence. The
        watch costs normal steps nothing: it exists only here."""
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])
        watch = self.watch()
        try:
            self._forward_backward(xs, ys, tokens)
            return watch.first()
        finally:
            watch.close()

    def _forward_backward(self, xs: list[torch.Tensor], ys: list[torch.Tensor], tokens: int,
                          on_saved: Callable[[int], None] | None = None) -> torch.Tensor:
        """Every micro-batch's forward and backward, and the gradients' reduction over dp
        finished; the global batch's loss (summed over dp, cp and pp) on every rank."""
        self.data_parallel.zero_grad()
        scale = self.scaler.scale if self.scaler else 1.0
        begin_step(self.moe, scale, tokens)
        if self.pipeline is not None:
            self.pipeline.loss_scale = scale
            loss = self.pipeline.run(xs, ys, tokens)
        else:
            loss = torch.zeros((), device=xs[0].device)
            for x, y in zip(xs, ys):
                saving = (count_saved_bytes(self.module, self.saved_tensor_hooks) if on_saved
                          else self.saved_tensor_hooks())
                with saving as saved:
                    with self.compute():
                        logits = self.forward(x)
                    part = self.loss_sum(logits, y) / tokens
                if on_saved:
                    on_saved(saved["bytes"])
                (part * scale if self.scaler else part).backward()
                loss += part.detach()
        self.data_parallel.finish_reduction()
        for axis in ("dp", "cp", "pp"):
            comm.all_reduce(self.mesh, axis, loss, tag="loss")
        return loss

    def asynchronous(self, xs: list[torch.Tensor], ys: list[torch.Tensor], tokens: int, step: int, last: bool,
                     set_lr: Callable[[int], None] | None = None) -> StepResult:
        """Step `step` (from 0) of the async schedule, PipeDream-2BW: its batch runs on the
        weights of the start of the step; the update at its end applies batch step-1's
        gradient (complete only now: its last backwards ran at the start of this step),
        with that batch's learning rate (`set_lr(batch)`). The `last` step also applies its
        own gradient, so a run makes as many updates as steps."""
        self.pipeline.begin_version(step)
        for layer in self.moe:  # no statistics: a segment runs parts of two batches
            layer.loss_normalizer = 1.0 / tokens
        loss = self.pipeline.run_segment(step, xs, ys, tokens, last)
        for axis in ("dp", "cp", "pp"):
            comm.all_reduce(self.mesh, axis, loss, tag="loss")
        norm = None
        for batch in ([step - 1] if step >= 1 else []) + ([step] if last else []):
            if set_lr:
                set_lr(batch)
            self.data_parallel.zero_grad()
            self.pipeline.finish_version(batch)
            self.data_parallel.finish_reduction()
            norm = clip_and_step(self.data_parallel, self.optimizer, self.mesh, self.max_grad_norm, step + 1,
                                 self.names)
        return StepResult(loss, norm, skipped=False)
