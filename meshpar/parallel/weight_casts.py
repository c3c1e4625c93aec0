"""16-bit copies of the weights are cast again in backward instead of kept.

Under bf16/fp16 autocast a matmul reads a 16-bit copy of its fp32 weight, and autograd
keeps that copy for the input gradient: 2 bytes per weight for every micro-batch whose
backward is still to come. That is harmless with one micro-batch in flight and plain
data parallelism, but it undoes two things meshpar is for:

- ZeRO-3 frees each layer's gathered weights after its forward; the copies would keep a
  whole 16-bit model per rank alive until backward (2 Psi bytes against ZeRO-3's 16 Psi / N).
- A pipeline stage holds up to pp micro-batches in flight (1F1B's first stage), each with
  its own copy of the stage's weights.

`RecastWeights.hooks` is a `saved_tensors_hooks` pair that recognises such a copy - a
16-bit `_to_copy` of one of the module's parameters, or a view of one (`linear` saves the
transposed weight) - keeps a reference to the parameter instead, and casts it again when
backward needs it. Rounding fp32 to 16 bits is deterministic, so the cast is the same
bits and every gradient is unchanged; the price is one more cast per weight per
backward (a read of the fp32 weight, a write of the copy). Autocast's own cache of the
copies must be off (`autocast(..., cache=False)`), or it would hold them until the
forward ends - the peak.

A parameter changed in place between forward and backward (the async schedule's
update) would be recast from its new value, so that is refused: a reference records the
parameter's version and unpacking checks it, as autograd does for a tensor it saved.

Compiled blocks (`--compile`) are out of this hook's sight; a joint-graph pass has their
partitioner do the same (`recast_weight_copies` in meshpar/parallel/compile.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class _Recast:
    """What is kept instead of a 16-bit weight copy: the parameter and the view's geometry."""

    param: nn.Parameter
    dtype: torch.dtype
    version: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def tensor(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError("a weight whose 16-bit copy backward needs was modified in place after its "
                               "forward; the copy cannot be cast again (see meshpar/parallel/weight_casts.py)")
        return self.param.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


def recasting(precision: str, zero: int, schedule: str | None) -> bool:
    """Whether the copies are cast again: 16-bit compute under ZeRO-3 or a pipeline
    (`schedule`, None without one), where keeping them would hold more than one copy of
    the weights - not the async schedule, whose update lands between forward and backward.
    One rank without a pipeline keeps its one set of copies (no extra cast)."""
    return precision != "fp32" and schedule != "async" and (zero == 3 or schedule is not None)


def keep_saved(pack: Callable | None = None, unpack: Callable | None = None):
    """Autograd keeps what it saves as it is: no hooks at all, or only a measurement's
    `pack`/`unpack`. The plain counterpart of `RecastWeights.hooks`."""
    return nullcontext() if pack is None else torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def saved_tensor_hooks(module: nn.Module, recast: bool) -> Callable:
    """The hooks every recorded forward of `module` runs under, as `hooks(pack=None,
    unpack=None)`: its weight copies recast (`recasting(...)` says when) or kept."""
    return RecastWeights(module).hooks if recast else keep_saved


class RecastWeights:
    """Saved-tensor hooks that keep references to `module`'s parameters instead of their
    16-bit copies (see the module docstring)."""

    def __init__(self, module: nn.Module):
        self.params = {id(p) for p in module.parameters()}

    def _reference(self, t: torch.Tensor) -> _Recast | None:
        base = t._base if t._is_view() else t
        if base.dtype not in SIXTEEN_BIT or base.grad_fn is None or base.grad_fn.name() != "ToCopyBackward0":
            return None
        param = getattr(base.grad_fn.next_functions[0][0], "variable", None)  # AccumulateGrad's leaf
        if param is None or id(param) not in self.params or param.dtype != torch.float32:
            return None
        if base.shape != param.shape or not base.is_contiguous() or base.storage_offset() != 0:
            return None  # not a plain cast of the whole parameter
        return _Recast(param, base.dtype, param._version, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def hooks(self, pack: Callable | None = None, unpack: Callable | None = None):
        """The `saved_tensors_hooks` context: weight copies become references, every other
        tensor goes through `pack`/`unpack` (e.g. a measurement's; none: kept as it is)."""
        def pack_(t: torch.Tensor):
            ref = self._reference(t)
            return ref if ref is not None else _Other(pack(t) if pack else t)

        def unpack_(held):
            if isinstance(held, _Recast):
                return held.tensor()
            return unpack(held.held) if unpack else held.held

        return torch.autograd.graph.saved_tensors_hooks(pack_, unpack_)


class _Other:
    """Whatever `pack` returned for a tensor that is not a weight copy."""

    __slots__ = ("held",)

    def __init__(self, held):
        self.held = held
