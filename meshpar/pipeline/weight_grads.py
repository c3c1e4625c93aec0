"""Zero-bubble's backward split at the linear layers: I computes the input gradients and
holds back the linear layers' weight gradients, W computes exactly those.

A linear layer y = x W^T + b has two gradient products: dx = dy W, on the critical
path (the previous stage waits for it), and dW = dy^T x, db = sum(dy), which only the
optimizer waits for (Qi et al. 2023, Section 2). While a split micro-batch's forward
runs, every `F.linear` whose weight is read only by matmuls (`read_only_by_matmuls`:
`nn.Linear`, meshpar's parallel linears, a plan's) goes through `_SplitLinear`. I is
then one ordinary backward of the stage in which each such layer computes dx and leaves
(x, dy) here instead of its weight gradient; every other parameter - norm gains,
embedding tables, a weight two modules share - gets its gradient in I as usual. W does
the held-back products and hands each to autograd at its weight
(`torch.autograd.backward(weights, grads)`): gradients accumulate and every hook on them
fires as in one backward (data parallelism's bucket reductions, ZeRO-3's freeing), once
per parameter and micro-batch. I and W together compute what one backward does, no
more, and the graph is freed after I: between I and W a micro-batch holds each linear
layer's input and output gradient, nothing else.

Under autocast the layer computes what autocast's linear would - input, weight and bias
cast to the autocast dtype, the product in that dtype, gradients cast back - and casts
the fp32 weight again in backward rather than keeping its 16-bit copy.

Compiled code is out of reach: the pipeline falls back to the generic split there
(I as `autograd.grad` with respect to the stage input, keeping the graph; W as a
backward restricted to the parameters, which walks the graph again).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from meshpar.parallel.param_gather import read_only_by_matmuls


class _SplitLinear(torch.autograd.Function):
    """F.linear whose backward returns only the input's gradient and files (x, dy) for W.
    The weight and bias come in a tuple, out of autograd's sight: an input's gradient
    edge would reach their accumulators in I, and their hooks would fire there too."""

    @staticmethod
    def forward(ctx, x, layer, dtype, store):
        weight, bias = layer
        ctx.layer, ctx.dtype, ctx.store, ctx.x_dtype = layer, dtype, store, x.dtype
        x, w, b = (t if t is None or dtype is None else t.to(dtype) for t in (x, weight, bias))
        ctx.save_for_backward(x)
        # Not F.linear: with a bias it returns a view of its 2-d result, and a custom
        # Function's view may not be changed in place (a tp region's all-reduce does).
        y = x.matmul(w.t())
        return y if b is None else y.add_(b)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.layer
        ctx.store.hold(weight, bias, x, grad_y)
        w = weight.detach() if ctx.dtype is None else weight.detach().to(ctx.dtype)
        return grad_y.matmul(w).to(ctx.x_dtype), None, None, None


class _RouteLinears(TorchFunctionMode):
    """Sends the deferrable `F.linear` calls of a recorded forward to `_SplitLinear`."""

    def __init__(self, store: "DeferredWeightGrads"):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
            x, weight, bias = given["input"], given["weight"], given.get("bias")
            if id(weight) in self.store.deferrable and x.requires_grad:  # else nothing to split
                device = x.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                if x.dtype == torch.float64:
                    dtype = None  # autocast leaves float64 alone
                with torch.autocast(device, enabled=False):
                    return _SplitLinear.apply(x, (weight, bias), dtype, self.store)
        return func(*args, **kwargs)


class DeferredWeightGrads:
    """The held-back weight gradients of one pipeline rank, by (stage, micro-batch).

    The routing is on only inside the modules that own deferrable weights (a forward
    pre-hook enters `_RouteLinears`, a forward hook leaves it), and only while `routing`:
    a mode sees every torch call made under it, and the rest of a block need not pay a
    Python call per operation. The hooks are installed once, here."""

    def __init__(self, module: nn.Module):
        self.deferrable = read_only_by_matmuls(module)
        self.pending: dict[tuple[int, int], list] = {}
        self.key: tuple[int, int] | None = None  # the micro-batch whose I is running
        self.routing = False
        self._modes: list[_RouteLinears | None] = []  # one per module forward entered
        for owner in module.modules():
            if any(id(p) in self.deferrable for p in owner.parameters(recurse=False)):
                owner.register_forward_pre_hook(self._enter)
                owner.register_forward_hook(self._leave, always_call=True)

    def _enter(self, _module, _args):
        mode = _RouteLinears(self) if self.routing else None
        if mode is not None:
            mode.__enter__()
        self._modes.append(mode)

    def _leave(self, _module, _args, _out):
        mode = self._modes.pop()
        if mode is not None:
            mode.__exit__(None, None, None)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Context of a split micro-batch's forward: its linear layers will hold their
        weight gradients back."""
        self.routing = True
        try:
            yield
        finally:
            self.routing = False

    @contextmanager
    def input_pass(self, key: tuple[int, int]) -> Iterator[None]:
        """Context of micro-batch `key`'s I: what its linear layers hold back is filed
        under `key`; a recomputation of the forward routes them again."""
        self.key = key
        self.pending.setdefault(key, [])
        try:
            with self.recording():
                yield
        finally:
            self.key = None

    def hold(self, weight, bias, x, grad_y) -> None:
        if self.key is None:
            raise RuntimeError("a split linear layer ran backward outside an I pass: a backward of a zero-bubble "
                               "micro-batch must go through the pipeline runtime")
        self.pending[self.key].append((weight, bias, x, grad_y))

    def weight_pass(self, key: tuple[int, int]) -> None:
        """W of micro-batch `key`: its held-back products, accumulated into the weights
        through autograd (each weight once, its hooks firing)."""
        grads: dict[int, list] = {}  # a layer called twice: its gradients summed first
        for weight, bias, x, grad_y in self.pending.pop(key, []):
            dy = grad_y.reshape(-1, grad_y.shape[-1])
            products = [(weight, dy.t().mm(x.reshape(-1, x.shape[-1])))]
            if bias is not None:
                products.append((bias, dy.sum(0)))
            for tensor, grad in products:
                grad = grad.to(tensor.dtype)
                if id(tensor) in grads:
                    grads[id(tensor)][1] += grad
                else:
                    grads[id(tensor)] = [tensor, grad]
        if grads:
            tensors, values = zip(*grads.values())
            torch.autograd.backward(list(tensors), list(values))

    def held(self, key: tuple[int, int]) -> bool:
        """Whether micro-batch `key` still has weight gradients to compute."""
        return bool(self.pending.get(key))

    def held_tensors(self) -> list[torch.Tensor]:
        """The layer inputs and output gradients held for W, every micro-batch's."""
        return [t for entries in self.pending.values() for _, _, x, dy in entries for t in (x, dy)]
