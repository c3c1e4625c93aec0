"""ZeRO-3: parameters gathered around each use.

Each unit gathers the buckets holding its parameters before its forward and again
before its backward, prefetching the next unit's (forward) or the previous one's
(backward), and frees them after. Under bf16/fp16 the compute's gathers carry the linear
weights in 16 bits, the very bits autocast would compute with, and the rest exact
(param_gather.py); a read of the values themselves (`gathered()`) gathers them exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.parallel.param_gather import SixteenBitGather, read_only_by_matmuls
from meshpar.parallel.zero.buckets import Bucket


@dataclass
class Gather:
    """One bucket's gathering: whether its full parameters are present, and the
    all-gather in flight."""

    gathered: bool = True  # a bucket starts gathered; the gathering frees it at once
    work: object = None
    source: torch.Tensor | None = None
    into: torch.Tensor | None = None  # where the in-flight gather lands
    sixteen_bit: SixteenBitGather | None = None  # the compute's gathers in 16 bits
    rounded: bool = False  # gathered in 16 bits: linear weights hold their rounding


class ParameterGathering:
    def __init__(self, module: nn.Module, units: list[nn.Module], buckets: list[Bucket], mesh: ParallelMesh,
                 slot_of: dict[int, tuple[Bucket, int]], compute_dtype: torch.dtype | None):
        self.mesh, self.buckets = mesh, buckets
        self.of = {b.index: Gather() for b in buckets}
        # A zero-bubble pipeline computes the linear layers' weight gradients in W,
        # without reading the weights (pipeline/weight_grads.py): a unit can then be freed
        # as soon as its input gradient is done, not when its last gradient arrives. That
        # assumes, as FSDP2's post-backward does, that nothing in the unit's backward reads
        # a parameter off the path to its input (y = f(x) + g(w)): true of meshpar's model,
        # which the trainer turns this on for; not known of a model of the API's.
        self.free_after_input_grad = False
        if compute_dtype is not None and mesh.size("dp") > 1:
            self._gather_in_16_bits(module, compute_dtype)
        self._install_hooks(units, slot_of)
        for b in buckets:
            self.free(b)

    def _gather_in_16_bits(self, module: nn.Module, dtype: torch.dtype):
        """Buckets holding linear weights gather them rounded to `dtype`, the rest exact;
        a bucket with none gathers fp32."""
        rounded = read_only_by_matmuls(module)
        for b in self.buckets:
            if not any(id(p) in rounded for p in b.params):
                continue
            n, rank = b.mesh.size("dp"), b.mesh.index("dp")
            if n == 1:  # experts held by one rank each (edp of 1): nothing to gather
                continue
            exact = torch.zeros(b.numel, dtype=torch.bool)  # the alignment padding is zeros: exact in 16 bits
            for p, offset in zip(b.params, b.offsets):
                exact[offset:offset + p.numel()] = id(p) not in rounded
            self.of[b.index].sixteen_bit = SixteenBitGather(exact, n, rank, dtype, b.param_flat.device)

    def _install_hooks(self, units: list[nn.Module], slot_of: dict[int, tuple[Bucket, int]]):
        """A weight two units share (tied embeddings) lies in one bucket that both gather."""
        held = []  # (unit, its buckets), forward order
        for unit in units:
            buckets = {slot_of[id(p)][0].index: slot_of[id(p)][0] for p in unit.parameters() if id(p) in slot_of}
            if buckets:
                held.append((unit, list(buckets.values())))
        users = Counter(b.index for _, buckets in held for b in buckets)
        for i, (unit, buckets) in enumerate(held):
            ahead = held[i + 1][1] if i + 1 < len(held) else []
            behind = held[i - 1][1] if i > 0 else []
            own = [b for b in buckets if users[b.index] == 1]  # a shared one waits for its other user
            unit.register_forward_pre_hook(lambda m, args, bs=buckets, ahead=ahead, own=own:
                                           self._before_forward(bs, ahead, own, args))
            unit.register_forward_hook(lambda m, args, out, bs=buckets, behind=behind:
                                       self._after_forward(bs, behind, out))

    def _before_forward(self, buckets: list[Bucket], ahead: list[Bucket], own: list[Bucket], args: tuple):
        purpose = "forward" if torch.is_grad_enabled() else "eval"
        for b in buckets:
            self.gather(b, purpose, wait=False)
        for b in ahead:  # prefetch: its all-gather runs while this unit computes
            self.gather(b, purpose, wait=False)
        for b in buckets:
            self._wait(b)
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if self.free_after_input_grad and own and x is not None and x.requires_grad and torch.is_grad_enabled():
            def after_backward(grad, own=own):  # every product reading the weights is done
                for b in own:
                    self.free(b)
            x.register_hook(after_backward)

    def _after_forward(self, buckets: list[Bucket], behind: list[Bucket], out):
        for b in buckets:
            self.free(b)

        def before_backward(grad, buckets=buckets, behind=behind):
            for b in buckets:
                self.gather(b, "backward", wait=False)
            for b in behind:
                self.gather(b, "backward", wait=False)
            for b in buckets:
                self._wait(b)
        # Every output the backward can enter through (a gathered bucket is not gathered twice).
        for tensor in _tensors_in(out):
            if tensor.requires_grad:
                tensor.register_hook(before_backward)

    def gather(self, b: Bucket, purpose: str, wait: bool = True):
        """Start gathering `b`'s full parameters (for `purpose`: forward, backward, eval,
        or read - the exact values)."""
        g = self.of[b.index]
        exact = purpose == "read"  # to read the values themselves, not to compute with them
        if g.gathered:
            if not (exact and g.rounded):
                return
            self.free(b)  # gathered rounded, for compute: a read gathers it again exact
        storage = b.param_flat.untyped_storage()
        storage.resize_(b.numel * b.param_flat.element_size())
        device = b.param_flat.device
        sixteen = None if exact else g.sixteen_bit
        # The shard goes to the device first (from host memory when offloaded: packed there).
        if sixteen is None:
            g.source, g.into = b.param_shard.to(device, copy=True), b.param_flat.data
        else:
            g.source = sixteen.pack(b.param_shard).to(device)
            g.into = torch.empty(sixteen.n * sixteen.width, dtype=sixteen.dtype, device=device)
        g.work = comm.all_gather_into(b.mesh, "dp", g.into, g.source, tag=f"params_{purpose}", async_op=True)
        g.gathered, g.rounded = True, sixteen is not None
        if wait:
            self._wait(b)

    def _wait(self, b: Bucket):
        g = self.of[b.index]
        if g.work is not None:
            with self.mesh.ledger.waiting("dp", "all_gather", "params"):
                g.work.wait()
            g.work = None
        if g.into is not None and g.rounded:
            g.sixteen_bit.unpack(g.into, b.param_flat.data)
        g.source = g.into = None

    def free(self, b: Bucket):
        """Release `b`'s full parameters (after any gather in flight lands)."""
        g = self.of[b.index]
        if not g.gathered:
            return
        self._wait(b)
        b.param_flat.untyped_storage().resize_(0)
        g.gathered = g.rounded = False

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Context: every bucket's full parameters present, exact, e.g. to read them."""
        for b in self.buckets:
            self.gather(b, "read")
        try:
            yield
        finally:
            for b in self.buckets:
                self.free(b)


def _tensors_in(out) -> list[torch.Tensor]:
    """The tensors a module returned: itself, or those in a tuple, list or mapping
    (transformers' ModelOutput is one), one level deep."""
    if torch.is_tensor(out):
        return [out]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [v for v in values if torch.is_tensor(v)]
