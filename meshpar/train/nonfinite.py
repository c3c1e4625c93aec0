"""Where a NaN or an Inf first appeared, in the order the computation ran.

A non-finite value spreads: made in the last pipeline stage's forward, it reaches the loss,
and backward carries it into every stage's gradients, so the lowest-numbered rank with a
bad gradient is stage 0 - the wrong place. This watch asks each module that holds
parameters itself (a linear layer, a norm, an embedding) two questions:

    forward     is its output finite?
    backward    is the gradient it sends back (of its input) finite?

It exists only to replay a step that diverged (meshpar/train/step.py): the step's forward
and backward run again from the same random state with these hooks, so the steps that do
not diverge pay nothing. The answers stay on the device until all are in. The first place
is then the earliest module of the model (its order in the whole model, the same on every
rank and stage) whose forward output was not finite; when no forward was, the latest
module whose backward was not - backward runs from the last module to the first. A
tensor-parallel layer's output is flagged before the sum over tp ranks (the regions' row
layers return their partial sums), so a value one tp rank made is found on that rank alone.

Modules inside a compiled block are not watched one by one (their hooks would run in the
compiled graph); the block is, as a whole.
"""

from __future__ import annotations

import torch
from torch import nn

FORWARD, BACKWARD = 0, 1
PHASES = ("forward", "backward")


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class NonFiniteWatch:
    """Checks each watched module's outputs and input gradients while it is installed;
    `first()` names the earliest non-finite one in the order the computation ran."""

    def __init__(self, module: nn.Module, order: dict[str, int], compiled: list[str] = ()):
        self.names: list[str] = []
        self.positions: list[int] = []  # each watched module's place in the whole model's order
        self.seen: list[tuple[int, int, torch.Tensor]] = []  # (phase, slot, whether all finite) per tensor
        self.handles = []
        for name, child in module.named_modules():
            if name not in order or any(name.startswith(c + ".") for c in compiled):
                continue
            if name not in compiled and not any(True for _ in child.parameters(recurse=False)):
                continue
            slot = len(self.names)
            self.names.append(name)
            self.positions.append(order[name])
            self.handles += [child.register_forward_pre_hook(self._watch_input(slot)),
                             child.register_forward_hook(self._watch_output(slot))]

    def close(self) -> None:
        """Remove the hooks (nothing is watched afterwards)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.seen = [], []

    def _flag(self, phase: int, slot: int, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point():
            self.seen.append((phase, slot, torch.isfinite(tensor).all()))

    def _watch_output(self, slot: int):
        def hook(module, inputs, output):
            for tensor in _tensors(output):
                self._flag(FORWARD, slot, tensor.detach())
        return hook

    def _watch_input(self, slot: int):
        def hook(module, inputs):
            for tensor in _tensors(inputs):
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad: self._flag(BACKWARD, slot, grad))
        return hook

    def first(self) -> tuple[int, int, str] | None:
        """(phase, sort key, module name) of this rank's first non-finite value, None if
        none was seen; sort keys compare across ranks: forward by the module's place,
        backward by the reverse of it, every forward before every backward."""
        if not self.seen:
            return None
        finite = torch.stack([ok for _, _, ok in self.seen]).tolist()  # one read from the device
        bad = {(phase, slot) for (phase, slot, _), ok in zip(self.seen, finite) if not ok}
        for phase in (FORWARD, BACKWARD):
            slots = [s for s in range(len(self.names)) if (phase, s) in bad]
            if slots:
                sign = 1 if phase == FORWARD else -1
                slot = min(slots, key=lambda s: sign * self.positions[s])
                return phase, sign * self.positions[slot], self.names[slot]
        return None
