"""The gradients' reduction over dp (and cp, and between the two ends of a pipeline).

A bucket's reduction is launched from the gradient hooks as soon as its last gradient of
the step has been accumulated (`overlap`), while backward goes on with earlier layers;
gradient accumulation over micro-batches communicates nothing until the final one.
Gradients that are partial over tp (sequence-parallel norms, replicated KV heads) are
summed over tp by `grad_sync` just before the dp reduction of their bucket. Stage 0
all-reduces; stages 1-3 reduce-scatter, and stages 2-3 keep only this rank's shard,
freeing the full buffer once its reduce-scatter is done (at most MAX_IN_FLIGHT at once).

Context-parallel ranks saw other tokens of the same sequences, so their gradients add up
over cp as well as dp, and cp takes its sum where the bytes are fewest. Stage 0: a
reduce-scatter over cp, the dp all-reduce of this rank's 1/cp, an all-gather over cp - dp
carries 1/cp of the gradient instead of all of it. Stages 1-3: the dp reduce-scatter
first, then an all-reduce over cp of this rank's shard alone. The cp collectives run in
bucket order (they must match on every cp rank), the first one in the hook, the last ones
once backward is done. A weight tied across pipeline stages then adds the two ends'
gradients with an all-reduce over `pp_ends` of what this rank keeps of it.

How the reductions cross dp - fp32, 16-bit, int8 with error feedback, hierarchical - is
the `GradReducer`'s business (grad_reduce.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.parallel.grad_reduce import GradReducer
from meshpar.parallel.sharding import tied_across_stages
from meshpar.parallel.zero.buckets import Bucket

MAX_IN_FLIGHT = 2  # stages 2-3: gradient reductions running at once (full buffers alive)


def sums_cp_parts(stage: int, mesh: ParallelMesh) -> bool:
    """Stage 0 sums a 1/cp part over dp (see the module docstring); not needed without dp."""
    return stage == 0 and mesh.size("cp") > 1 and mesh.size("dp") > 1


def mixes_ranks(mesh: ParallelMesh) -> bool:
    """Whether a reduction (tp, cp or dp) mixes this rank's gradients with others'."""
    return any(mesh.size(axis) > 1 for axis in ("tp", "cp", "dp"))


@dataclass
class Progress:
    """One bucket's gradients in a step: how many arrived, and its reduction."""

    accumulated: int = 0  # gradient accumulations this step, over all params
    accumulated_deferred: int = 0  # those of them computed in a zero-bubble W
    launched: bool = False
    work: object = None  # the reduction in flight, if any
    reduced_into: torch.Tensor | None = None  # stage 1: where the reduce-scatter landed
    cp_part: torch.Tensor | None = None  # stage 0 with cp and dp: this rank's 1/cp, reduced over dp
    finite: torch.Tensor | None = None  # this rank's own gradients were finite (before any reduction)


class GradientReduction:
    """The buckets' gradients from backward's hooks to this rank's reduced shard.
    `unit_done(b)`: called when a micro-batch's backward through bucket `b` is over
    (ZeRO-3 frees its parameters then)."""

    def __init__(self, buckets: list[Bucket], mesh: ParallelMesh, stage: int, reducer: GradReducer, overlap: bool,
                 microbatches: int, grad_sync: Callable[[list[nn.Parameter]], None],
                 slot_of: dict[int, tuple[Bucket, int]], unit_done: Callable[[Bucket], None] | None = None):
        self.buckets, self.mesh, self.stage, self.reducer = buckets, mesh, stage, reducer
        self.overlap, self.microbatches, self.grad_sync = overlap, microbatches, grad_sync
        self.slot_of, self.unit_done = slot_of, unit_done
        self.cp = mesh.size("cp")
        self.cp_parts, self.reduces = sums_cp_parts(stage, mesh), mixes_ranks(mesh)
        self.of = {b.index: Progress() for b in buckets}
        self.events: list[tuple[float, str, int]] = []  # (time, what, bucket): the overlap trace
        # Ids of the parameters whose gradients a zero-bubble W computes (set by the trainer).
        self.deferred: frozenset[int] = frozenset()
        self._in_flight: list[Bucket] = []  # stages 2-3: launched reductions, oldest first
        self._chains: list[Bucket] = []  # launched reductions with collectives still to start, oldest first
        for p in (p for b in buckets for p in b.params):
            p.register_post_accumulate_grad_hook(self._on_grad)

    def reduced(self, b: Bucket) -> torch.Tensor:
        """This rank's reduced gradient of `b`, where the optimizer reads it."""
        if self.stage == 0:
            return b.grad_flat
        if self.stage == 1:
            return b.grad_flat[b.shard[0]:b.shard[1]]
        return b.grad_shard

    def zero_grad(self) -> None:
        """Start a step: no gradient accumulated, no reduction launched."""
        for b in self.buckets:
            self.of[b.index] = Progress()
            # The bucket's values are not zeroed: each parameter's first gradient of the
            # step is copied into its slot (_on_grad), later ones accumulate there.
            for p in b.params:
                p.grad = None
        self._in_flight.clear()
        self._chains.clear()
        self.events.clear()

    def _on_grad(self, p: nn.Parameter):
        b, i = self.slot_of[id(p)]
        progress = self.of[b.index]
        if b.grad_flat is None:  # stages 2-3: the full buffer lives from here to the reduction
            b.grad_flat = torch.empty(b.numel, dtype=p.dtype, device=p.device)
            b.grad_flat[b.used:].zero_()  # the alignment padding
        # The step's first gradient of p is a fresh tensor: copied into the bucket, which
        # then receives the later micro-batches' in place.
        self._into_slot(b, i, p)
        progress.accumulated += 1
        if self.unit_done is not None and self._backward_over(b, p):  # this unit's backward of one micro-batch
            self.unit_done(b)
        if self.overlap and progress.accumulated == len(b.params) * self.microbatches:
            self._launch(b)

    def _backward_over(self, b: Bucket, p: nn.Parameter) -> bool:
        """Whether gradient p, just accumulated, ends bucket b's backward of one micro-batch.
        Split at the linear layers (zero-bubble), a bucket's other gradients arrive in I and
        its deferred ones in W, micro-batches apart: only the end of a W ends it then. A
        count over both would reach a multiple of the bucket's size inside a later I and
        free the weights that I's products were about to read."""
        progress = self.of[b.index]
        if not self.deferred:
            return progress.accumulated % len(b.params) == 0
        deferred_here = sum(id(q) in self.deferred for q in b.params)
        if id(p) in self.deferred:
            progress.accumulated_deferred += 1
            return progress.accumulated_deferred % deferred_here == 0
        return deferred_here == 0 and progress.accumulated % len(b.params) == 0

    def _launch(self, b: Bucket):
        """Start the bucket's dp reduction (asynchronous when overlapping)."""
        progress = self.of[b.index]
        # One flag per bucket, read only when the step's gradient norm is not finite: it
        # tells which rank a NaN came from before the reduction spread it to every rank
        # (an extra read of the gradients, skipped where nothing is reduced).
        if self.reduces:
            progress.finite = torch.isfinite(b.grad_flat).all()
        self._advance_chains()
        self.grad_sync(b.params)
        self.events.append((time.perf_counter(), "launch", b.index))
        if self.cp_parts:
            progress.cp_part = torch.empty(b.numel // self.cp, dtype=b.grad_flat.dtype, device=b.grad_flat.device)
            comm.reduce_scatter_into(self.mesh, "cp", progress.cp_part, b.grad_flat, tag="grads")
            progress.work = b.reducer.all_reduce(b.index, progress.cp_part)
        elif self.stage == 0:
            comm.all_reduce(self.mesh, "cp", b.grad_flat, tag="grads")  # dp = 1: nothing to save
            progress.work = b.reducer.all_reduce(b.index, b.grad_flat)
        else:
            out = b.grad_shard if b.grad_shard is not None else torch.empty_like(b.param_shard)
            progress.reduced_into = out
            progress.work = b.reducer.reduce_scatter(b.index, b.grad_flat, out)
        progress.launched = True
        if progress.work is not None and progress.work.collectives_left:
            self._chains.append(b)
        self._free_finished()
        if self.stage >= 2:
            self._limit_in_flight(b)

    def _advance_chains(self):
        """A reduction of several collectives in turn (hierarchical: inside the node, across
        nodes, inside again; int8's all-reduce: an all-to-all, then an all-gather of the
        re-quantized sums) starts its next collective at each later launch, so all but the
        last bucket's finish during backward. Every rank launches in the same order, so
        the collectives match; waiting for the previous one rarely blocks, as a bucket's
        worth of backward ran since it began."""
        for b in self._chains:
            with self.mesh.ledger.waiting("dp", "gradient reduction", "grads"):
                self.of[b.index].work.advance()
            self.events.append((time.perf_counter(), "advance", b.index))
        self._chains = [b for b in self._chains
                        if self.of[b.index].work is not None and self.of[b.index].work.collectives_left]

    def _limit_in_flight(self, launched: Bucket):
        """Stages 2-3: wait for the oldest reductions while more than MAX_IN_FLIGHT are
        running, so that at most that many full gradient buffers exist at once. Unbounded,
        every unit's buffer lived to the end of backward when gloo's reduce-scatters lagged
        behind it: 2.4 units' bytes per layer at the peak of a 0.8B model's ZeRO-3 rank
        (benchmarks/large_model.py). Only local waits: no collective is reordered."""
        self._in_flight = [b for b in self._in_flight if b.grad_flat is not None] + [launched]
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._complete(self._in_flight.pop(0))

    def _complete(self, b: Bucket):
        progress = self.of[b.index]
        if progress.work is not None:
            with self.mesh.ledger.waiting("dp", "gradient reduction", "grads"):
                progress.work.wait()
            progress.work = None
        if self.stage == 1 and progress.reduced_into is not None:
            b.grad_flat[b.shard[0]:b.shard[1]].copy_(progress.reduced_into)
            progress.reduced_into = None
        if self.stage >= 2 and b.grad_flat is not None:
            b.grad_flat = None
            for p in b.params:
                p.grad = None

    def _free_finished(self):
        """Stages 2-3: release full gradient buffers whose reduce-scatter is done."""
        if self.stage < 2:
            return
        for b in self.buckets:
            progress = self.of[b.index]
            if progress.launched and b.grad_flat is not None and (progress.work is None
                                                                  or progress.work.is_completed()):
                self._complete(b)

    def finish(self) -> None:
        """After the last backward of the step: launch what the hooks did not (no overlap,
        or gradients set outside backward) and wait for every reduction."""
        self.events.append((time.perf_counter(), "backward_done", -1))
        for b in self.buckets:
            if not self.of[b.index].launched:
                if b.grad_flat is None:  # stage 2-3 bucket that received no gradient
                    b.grad_flat = torch.zeros(b.numel, dtype=b.param_shard.dtype, device=b.param_shard.device)
                for i, p in enumerate(b.params):  # also one that received none, or was set outside backward
                    self._into_slot(b, i, p)
                self._launch(b)
        for b in self.buckets:  # in bucket order: the cp collectives must match on every cp rank
            self._complete(b)
            progress = self.of[b.index]
            if progress.cp_part is not None:
                comm.all_gather_into(self.mesh, "cp", b.grad_flat, progress.cp_part, tag="grads")
                progress.cp_part = None
            elif self.stage >= 1:
                comm.all_reduce(self.mesh, "cp", self.reduced(b), tag="grads")
        for b in self.buckets:  # one per end, if any: the same call on both
            if any(tied_across_stages(p) for p in b.params):
                comm.all_reduce(self.mesh, "pp_ends", self.reduced(b), tag="tied_grads")
        self.events.append((time.perf_counter(), "reduced", -1))

    def _into_slot(self, b: Bucket, i: int, p: nn.Parameter):
        """p's gradient becomes its slot in the bucket: copied there from a fresh tensor,
        zero if p has none."""
        slot = b.view(b.grad_flat, i)
        if p.grad is None:
            slot.zero_()
        elif p.grad.data_ptr() != slot.data_ptr():
            slot.copy_(p.grad)
        p.grad = slot
