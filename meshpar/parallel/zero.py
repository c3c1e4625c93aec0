"""Data parallelism over the `dp` axis, replicated or sharded (ZeRO stages 0-3).

Parameters and gradients live in flat buckets; each parameter (and its `.grad`) is a view
into its bucket. A bucket is a run of consecutive *units* (the embedding, each transformer
layer, the final norm, the output layer), taken in reverse order - the order in which
backward finishes them - and closed at `bucket_bytes`; under ZeRO-3 a bucket is exactly
one unit, the granularity at which parameters are gathered (a weight two units share, as
tied embeddings do, lies in the bucket of the later one, and both gather it).

    stage  parameters          gradients                       optimizer states + update
    0      full                full, all-reduced               full, every rank
    1      full                full, reduce-scattered          1/N: each rank its shard,
    2      full                1/N: reduce-scattered, the        then the parameters are
                               full buffer freed                 all-gathered
    3      1/N, gathered per   1/N, as stage 2                 1/N, no gather after it
           unit for its forward and again for its backward

With N = dp ranks, the wire bytes per rank and step (ring-equivalent) are 2(N-1)/N of the
gradient bytes for stages 0-2 (all-reduce, or reduce-scatter + all-gather) and 3(N-1)/N
for stage 3 (two gathers and a reduce-scatter), once per step when there is one
micro-batch; with m micro-batches stage 3 gathers 2m times. Under bf16/fp16 stage 3's
gathers carry the linear weights in 16 bits, the very bits autocast would compute with,
and the rest exact (param_gather.py): about 2(N-1)/N in all.

A bucket's reduction is launched from the gradient hooks as soon as its last gradient of
the step has been accumulated (`overlap`), while backward goes on with earlier layers;
gradient accumulation over micro-batches communicates nothing until the final one.
Gradients that are partial over tp (sequence-parallel norms, replicated KV heads) are
summed over tp by `grad_sync` just before the dp reduction of their bucket.

Context-parallel ranks saw other tokens of the same sequences, so their gradients add up
over cp as well as dp, and cp takes its sum where the bytes are fewest. Stage 0: a
reduce-scatter over cp, the dp all-reduce of this rank's 1/cp, an all-gather over cp - dp
carries 1/cp of the gradient instead of all of it. Stages 1-3: the dp reduce-scatter
first, then an all-reduce over cp of this rank's shard alone (1/dp of the gradient
instead of all of it). The cp collectives run in bucket order (they must match on every
cp rank), the first one in the hook, the last ones once backward is done.

A weight tied across pipeline stages (the embedding, held by the first and the last)
gets a bucket of its own - the same layout on both ends - and once its dp and cp sums
are done, an all-reduce over `pp_ends` of what this rank keeps of it (its dp shard under
ZeRO 1-2) adds the two stages' gradients.

How the reductions cross dp - fp32, 16-bit, int8 with error feedback, hierarchical - is
the `GradReducer`'s business (grad_reduce.py).

With nothing to reduce over dp or cp - one rank on each, stage 0, nothing offloaded, no
weight tied across stages - a bucket would only copy each gradient once more: the
gradients stay where autograd accumulates them (`direct`), as in a plain PyTorch loop,
and the few that are partial over tp are summed once backward is done. They live from
backward to the next step's `zero_grad`, not through its forward: 4 bytes per parameter
less at the activations' peak (with one micro-batch and no pipeline).

Offload: `optimizer` keeps an fp32 master copy of this rank's shard, its gradient and the
optimizer states in host memory and runs the step there; `params` (stage 3) keeps the
parameter shards themselves in host memory between uses.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from meshpar import comm
from meshpar.init import Materialization, adopt_storage, fill_flat
from meshpar.init import materialize as materialize_rest
from meshpar.mesh import ParallelMesh
from meshpar.options import Section, comma_list, option
from meshpar.parallel.grad_reduce import GradReducer
from meshpar.parallel.param_gather import SixteenBitGather, read_only_by_matmuls
from meshpar.parallel.sharding import model_names, tied_across_stages

if TYPE_CHECKING:
    from meshpar.config import Config

STAGES = (0, 1, 2, 3)
MAX_IN_FLIGHT = 2  # stages 2-3: gradient reductions running at once (full buffers alive)
OFFLOADS = ("optimizer", "params")


@dataclass
class ZeroOptions(Section):
    """ZeRO over dp: which of the training state is sharded, and what lives in host memory."""

    stage: int = option(0, "ZeRO stage: 0 replicated, 1 optimizer states sharded, 2 and gradients, 3 and "
                           "parameters", flag="--zero", choices=STAGES)
    offload: list[str] = option([], "keep in host memory: optimizer (states, master weights and the step), "
                                    "params (ZeRO-3 shards; implies optimizer); comma-separated",
                                parse=comma_list(str, "names"))

    def problems(self, cfg: Config) -> list[str]:
        problems = []
        unknown = [o for o in self.offload if o not in OFFLOADS]
        if unknown:
            problems.append(f"--offload {','.join(unknown)}: choose from {', '.join(OFFLOADS)}")
        if "params" in self.offload and self.stage != 3:
            problems.append("--offload params keeps parameter shards in host memory: it needs --zero 3")
        return problems


def units_of(module: nn.Module) -> list[nn.Module]:
    """The modules holding parameters, in forward order: direct children, with module
    lists and dicts (the layers) opened one level, and a child that holds such a list but
    no parameter of its own (transformers' inner `model`, around its layers) opened in
    turn - as one unit it would hold every layer's weights at once."""
    units = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += [m for m in child.children() if any(True for _ in m.parameters())]
        elif not any(True for _ in child.parameters()):
            continue
        elif _holds_layers(child) and not any(True for _ in child.parameters(recurse=False)):
            units += units_of(child)
        else:
            units.append(child)
    return units


def _holds_layers(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) for m in module.modules())


def _tensors_in(out) -> list[torch.Tensor]:
    """The tensors a module returned: itself, or those in a tuple, list or mapping
    (transformers' ModelOutput is one), one level deep."""
    if torch.is_tensor(out):
        return [out]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [v for v in values if torch.is_tensor(v)]


@dataclass
class OptimizerPiece:
    """One optimizer leaf: elements [start, stop) of `param`'s flattened local tensor,
    this rank's share of it (all of it below ZeRO-1)."""

    param: nn.Parameter
    start: int
    stop: int
    leaf: nn.Parameter  # what the optimizer steps; its state is keyed by it


@dataclass
class Bucket:
    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # padded to a multiple of the dp size when sharded
    shard: tuple[int, int]  # this rank's [start, end) of the flat buffer
    param_flat: torch.Tensor  # full parameters; under ZeRO-3 allocated only while gathered
    param_shard: torch.Tensor  # this rank's slice: a view of param_flat, or its own (ZeRO-3)
    grad_shard: torch.Tensor | None = None  # stage 2-3: this rank's reduced gradient
    grad_flat: torch.Tensor | None = None  # full gradients; stages 2-3 free it after reduction
    cp_part: torch.Tensor | None = None  # stage 0 with cp and dp: this rank's 1/cp, reduced over dp
    accumulated: int = 0  # gradient accumulations this step, over all params
    accumulated_deferred: int = 0  # those of them computed in a zero-bubble W
    reduction: object = None  # the in-flight work, if any
    reduced_into: torch.Tensor | None = None  # stage 1: where the reduce-scatter landed
    launched: bool = False
    gathered: bool = True
    gather_work: object = None
    gather_source: torch.Tensor | None = None
    gather_into: torch.Tensor | None = None  # where the in-flight gather lands
    sixteen_bit: SixteenBitGather | None = None  # ZeRO-3 under bf16/fp16: compute's gathers in 16 bits
    rounded: bool = False  # gathered in 16 bits: linear weights hold their rounding
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # offloaded master, grad
    finite: torch.Tensor | None = None  # this rank's own gradients were finite (before any reduction)

    def owned(self):
        """(parameter, slice of this rank's shard) for each parameter overlapping the shard."""
        lo_shard, hi_shard = self.shard
        for p, offset in zip(self.params, self.offsets):
            lo, hi = max(offset, lo_shard), min(offset + p.numel(), hi_shard)
            if lo < hi:
                yield p, slice(lo - lo_shard, hi - lo_shard)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)


class ShardedDataParallel:
    """Data parallelism over the mesh's dp axis at ZeRO stage 0-3 (see the module
    docstring): flat gradient buckets reduced from backward hooks, the optimizer on this
    rank's shard (`optimizer_params`), parameters gathered back after `step`."""

    def __init__(self, module: nn.Module, mesh: ParallelMesh, stage: int = 0,
                 bucket_bytes: int = 25 * 2**20, overlap: bool = True, offload: tuple[str, ...] = (),
                 microbatches: int = 1, grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
                 reducer: GradReducer | None = None, compute_dtype: torch.dtype | None = None,
                 materialize: Materialization | None = None):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage {stage}: choose one of {', '.join(map(str, STAGES))}")
        offload = set(offload) | ({"optimizer"} if "params" in offload else set())  # params implies it
        self.mesh, self.stage, self.overlap, self.offload = mesh, stage, overlap, tuple(sorted(offload))
        self.bucket_bytes = bucket_bytes
        # A model built on the meta device gets its parameters' storage here, in the flat
        # buffers, and filled there: under ZeRO-3 only this rank's shard is ever drawn.
        self.materialize = materialize
        self._names = {id(p): name for name, p in model_names(module)} if materialize else {}
        self.microbatches = microbatches
        self.grad_sync = grad_sync or (lambda params: None)
        self.reducer = reducer or GradReducer(mesh)
        self.n, self.rank = mesh.size("dp"), mesh.index("dp")
        self.cp = mesh.size("cp")
        # Stage 0 sums a 1/cp part over dp (see the module docstring); not needed without dp.
        self.cp_parts = stage == 0 and self.cp > 1 and self.n > 1
        # Whether a reduction (tp, cp or dp) mixes this rank's gradients with others'.
        self.reduces = any(mesh.size(axis) > 1 for axis in ("tp", "cp", "dp"))
        # Nothing to reduce over dp or cp: gradients stay autograd's (see the module docstring).
        self.direct = (stage == 0 and self.n == 1 and self.cp == 1 and not offload
                       and not any(tied_across_stages(p) for p in module.parameters()))
        self.events: list[tuple[float, str, int]] = []  # (time, what, bucket): the overlap trace
        # ZeRO-3: a zero-bubble pipeline computes the linear layers' weight gradients in W,
        # without reading the weights (pipeline/weight_grads.py): a unit can then be freed
        # as soon as its input gradient is done, not when its last gradient arrives. That
        # assumes, as FSDP2's post-backward does, that nothing in the unit's backward reads
        # a parameter off the path to its input (y = f(x) + g(w)): true of meshpar's model,
        # which the trainer turns this on for; not known of a model of the API's.
        self.free_after_input_grad = False
        # Ids of the parameters whose gradients a zero-bubble W computes (set by the trainer).
        self.deferred: frozenset[int] = frozenset()
        self.buckets: list[Bucket] = []
        self._in_flight: list[Bucket] = []  # stages 2-3: launched reductions, oldest first
        units = units_of(module)
        seen: set[int] = set()
        pending: list[nn.Module] = []
        pending_bytes = 0
        for unit in reversed(units):
            tied = [p for p in unit.parameters() if tied_across_stages(p) and id(p) not in seen]
            if tied:  # a bucket of its own, laid out alike on both ends
                if pending:
                    self._add_bucket(pending, seen)
                self._add_bucket([unit], seen, only=tied)
                pending, pending_bytes = [], 0
            pending.insert(0, unit)
            pending_bytes += sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) not in seen)
            if stage == 3 or pending_bytes >= bucket_bytes:
                self._add_bucket(pending, seen)
                pending, pending_bytes = [], 0
        if pending:
            self._add_bucket(pending, seen)
        self.optimizer_pieces: list[OptimizerPiece] = []  # filled by optimizer_params()
        self._slot_of = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        if not self.direct:
            for p in self.params():
                p.register_post_accumulate_grad_hook(self._on_grad)
        if stage == 3:
            if compute_dtype is not None and self.n > 1:
                self._gather_in_16_bits(module, compute_dtype)
            self._install_gather_hooks(units)
            for b in self.buckets:
                self._free_params(b)
        if materialize is not None:  # what no bucket holds (frozen parameters) on its own; buffers moved
            materialize_rest(module, materialize.mesh, materialize.device, materialize.fill)

    # --- layout -----------------------------------------------------------------------

    def _add_bucket(self, units: list[nn.Module], seen: set[int], only: list[nn.Parameter] | None = None):
        """A bucket of the units' parameters not yet in one (`only` these, if given)."""
        params = []
        for unit in units:
            for p in (only if only is not None else unit.parameters()):
                if p.requires_grad and id(p) not in seen:  # a tied weight belongs to one bucket
                    seen.add(id(p))
                    params.append(p)
        if not params:
            return
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        sharded = self.stage >= 1
        align = self.reducer.alignment(sharded) * (self.cp if self.cp_parts else 1)
        numel = -(-total // align) * align
        size = numel // self.n if sharded else numel
        start = self.rank * size if sharded else 0
        first = params[0]
        meta = first.is_meta
        device = self.materialize.device if meta else first.device
        # On meta, the buffer is left untouched (no resident pages) until filled: under
        # ZeRO-3 only the shard is, and the buffer is freed below before any gather.
        param_flat = (torch.empty if meta else torch.zeros)(numel, dtype=first.dtype, device=device)
        with torch.no_grad():
            param_flat[total:].zero_()  # the alignment padding
            for p, offset in zip(params, offsets):
                view = param_flat[offset:offset + p.numel()].view_as(p)
                if p.is_meta:
                    adopt_storage(p, view)
                    if self.stage < 3:
                        self._fill(view.reshape(-1), p, 0)
                else:
                    view.copy_(p.detach())
                    p.data = view
        param_shard = param_flat[start:start + size]
        if self.stage == 3:
            home = "cpu" if "params" in self.offload else device
            if meta:
                param_shard = torch.zeros(size, dtype=first.dtype, device=home)
                for p, offset in zip(params, offsets):
                    lo, hi = max(offset, start), min(offset + p.numel(), start + size)
                    if lo < hi:
                        self._fill(param_shard[lo - start:hi - start], p, lo - offset)
            else:
                param_shard = param_shard.clone().to(home)
            if home == "cpu" and torch.cuda.is_available():
                param_shard = param_shard.pin_memory()
        bucket = Bucket(len(self.buckets), params, offsets, numel, (start, start + size),
                        param_flat, param_shard)
        if self.direct:
            pass  # the gradients stay autograd's
        elif self.stage <= 1:
            bucket.grad_flat = torch.zeros_like(param_flat)
            for i, p in enumerate(params):
                p.grad = bucket.view(bucket.grad_flat, i)
        else:
            bucket.grad_shard = torch.zeros_like(param_shard, device=first.device)
        if "optimizer" in self.offload:
            pin = torch.cuda.is_available()
            master = param_shard if param_shard.device.type == "cpu" and self.stage == 3 else \
                param_shard.detach().to("cpu", copy=True)
            bucket.host = {"master": master.pin_memory() if pin and not master.is_pinned() else master,
                           "grad": torch.zeros(size, dtype=first.dtype, pin_memory=pin)}
        self.buckets.append(bucket)

    def _fill(self, out: torch.Tensor, p: nn.Parameter, start: int) -> None:
        """out := elements [start, ...) of meta-built p's local tensor, by the
        materialization's fill (left as they are when a checkpoint will be loaded)."""
        if self.materialize.fill is not None:
            fill_flat(out, p, self.materialize.mesh, self._names[id(p)], start, self.materialize.fill)

    def _gather_in_16_bits(self, module: nn.Module, dtype: torch.dtype):
        """Buckets holding linear weights gather them rounded to `dtype`, the rest exact
        (param_gather.py); a bucket with none gathers fp32."""
        rounded = read_only_by_matmuls(module)
        for b in self.buckets:
            if not any(id(p) in rounded for p in b.params):
                continue
            exact = torch.zeros(b.numel, dtype=torch.bool)  # the alignment padding is zeros: exact in 16 bits
            for p, offset in zip(b.params, b.offsets):
                exact[offset:offset + p.numel()] = id(p) not in rounded
            b.sixteen_bit = SixteenBitGather(exact, self.n, self.rank, dtype, b.param_flat.device)

    def params(self) -> list[nn.Parameter]:
        """The parameters it manages, bucket by bucket."""
        return [p for b in self.buckets for p in b.params]

    def _master(self, b: Bucket) -> torch.Tensor:
        return b.host["master"] if b.host else b.param_shard

    def _grad_of_shard(self, b: Bucket) -> torch.Tensor:
        """This rank's reduced gradient, where the optimizer reads it (before offload)."""
        assert not self.direct, "direct gradients have no bucket"
        if self.stage == 0:
            return b.grad_flat
        if self.stage == 1:
            return b.grad_flat[b.shard[0]:b.shard[1]]
        return b.grad_shard

    def optimizer_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(decayed, undecayed) leaf tensors for the optimizer: each parameter's piece of
        this rank's shard, aliasing the master shard, with `.grad` aliasing its gradient.
        Matrices are decayed, vectors (norm gains) not - as the whole parameter would be."""
        decayed, undecayed = [], []
        self.optimizer_pieces = []
        for b in self.buckets:
            master = self._master(b)
            grad = None if self.direct else b.host["grad"] if b.host else self._grad_of_shard(b)
            for p, part in b.owned():
                piece = nn.Parameter(master[part])
                piece.grad = None if self.direct else grad[part]  # direct: pointed at p.grad by step()
                (decayed if p.ndim >= 2 else undecayed).append(piece)
                offset = b.offsets[next(i for i, q in enumerate(b.params) if q is p)]
                self.optimizer_pieces.append(OptimizerPiece(p, part.start + b.shard[0] - offset,
                                                            part.stop + b.shard[0] - offset, piece))
        return decayed, undecayed

    @torch.no_grad()
    def load_params(self, values_of: Callable[[nn.Parameter], torch.Tensor]) -> None:
        """Overwrite every parameter with `values_of(param)` (its whole local tensor)
        wherever this rank keeps it: the full buffer, its shard, the offloaded master."""
        for b in self.buckets:
            lo_shard, hi_shard = b.shard
            for p, offset in zip(b.params, b.offsets):
                values = values_of(p).reshape(-1).to(b.param_shard.dtype)
                if self.stage < 3:
                    b.param_flat[offset:offset + p.numel()].copy_(values)
                lo, hi = max(offset, lo_shard), min(offset + p.numel(), hi_shard)
                if lo < hi:
                    mine = values[lo - offset:hi - offset]
                    b.param_shard[lo - lo_shard:hi - lo_shard].copy_(mine)
                    if b.host and b.host["master"] is not b.param_shard:
                        b.host["master"][lo - lo_shard:hi - lo_shard].copy_(mine)

    def produced_nonfinite(self) -> bool:
        """Whether this rank's own gradients (before reduction) held a NaN or Inf."""
        if not self.reduces:  # the gradients are still this rank's own
            return any(not bool(torch.isfinite(g).all()) for g in self.grads())
        return any(b.finite is not None and not bool(b.finite) for b in self.buckets)

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, gradient piece) for every piece this rank owns after reduction."""
        if self.direct:
            return [(p, p.grad.view(-1)) for p in self.params()]
        return [(p, self._grad_of_shard(b)[part]) for b in self.buckets for p, part in b.owned()]

    def grads(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shards (for unscaling and clipping)."""
        if self.direct:
            return [p.grad for p in self.params()]
        return [self._grad_of_shard(b) for b in self.buckets]

    @property
    def grads_sharded(self) -> bool:
        return self.stage >= 1

    # --- a step -----------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Start a step: no gradient accumulated, no reduction launched."""
        for b in self.buckets:
            b.accumulated, b.launched, b.reduction, b.reduced_into = 0, False, None, None
            b.accumulated_deferred = 0
            # The bucket's values are not zeroed: each parameter's first gradient of the
            # step is copied into its slot (_on_grad), later ones accumulate there.
            for p in b.params:
                p.grad = None
        self._in_flight.clear()
        self.events.clear()

    def _on_grad(self, p: nn.Parameter):
        b, i = self._slot_of[id(p)]
        if b.grad_flat is None:  # stages 2-3: the full buffer lives from here to the reduction
            b.grad_flat = torch.empty(b.numel, dtype=p.dtype, device=p.device)
            b.grad_flat[b.offsets[-1] + b.params[-1].numel():].zero_()  # the alignment padding
        # The step's first gradient of p is a fresh tensor: copied into the bucket, which
        # then receives the later micro-batches' in place.
        self._into_slot(b, i, p)
        b.accumulated += 1
        if self.stage == 3 and self._backward_over(b, p):  # this unit's backward for one micro-batch
            self._free_params(b)
        if self.overlap and b.accumulated == len(b.params) * self.microbatches:
            self._launch(b)

    def _backward_over(self, b: Bucket, p: nn.Parameter) -> bool:
        """Whether gradient p, just accumulated, ends bucket b's backward of one micro-batch.
        Split at the linear layers (zero-bubble), a bucket's other gradients arrive in I and
        its deferred ones in W, micro-batches apart: only the end of a W ends it then. A
        count over both would reach a multiple of the bucket's size inside a later I and
        free the weights that I's products were about to read."""
        if not self.deferred:
            return b.accumulated % len(b.params) == 0
        deferred_here = sum(id(q) in self.deferred for q in b.params)
        if id(p) in self.deferred:
            b.accumulated_deferred += 1
            return b.accumulated_deferred % deferred_here == 0
        return deferred_here == 0 and b.accumulated % len(b.params) == 0

    def _launch(self, b: Bucket):
        """Start the bucket's dp reduction (asynchronous when overlapping)."""
        # One flag per bucket, read only when the step's gradient norm is not finite: it
        # tells which rank a NaN came from before the reduction spread it to every rank
        # (an extra read of the gradients, skipped where nothing is reduced).
        if self.reduces:
            b.finite = torch.isfinite(b.grad_flat).all()
        self.grad_sync(b.params)
        self.events.append((time.perf_counter(), "launch", b.index))
        if self.cp_parts:
            b.cp_part = torch.empty(b.numel // self.cp, dtype=b.grad_flat.dtype, device=b.grad_flat.device)
            comm.reduce_scatter_into(self.mesh, "cp", b.cp_part, b.grad_flat, tag="grads")
            b.reduction = self.reducer.all_reduce(b.index, b.cp_part)
        elif self.stage == 0:
            comm.all_reduce(self.mesh, "cp", b.grad_flat, tag="grads")  # dp = 1: nothing to save
            b.reduction = self.reducer.all_reduce(b.index, b.grad_flat)
        else:
            out = b.grad_shard if b.grad_shard is not None else torch.empty_like(b.param_shard)
            b.reduced_into = out
            b.reduction = self.reducer.reduce_scatter(b.index, b.grad_flat, out)
        b.launched = True
        self._free_finished()
        if self.stage >= 2:
            self._limit_in_flight(b)

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
        if b.reduction is not None:
            with self.mesh.ledger.waiting("dp", "gradient reduction", "grads"):
                b.reduction.wait()
            b.reduction = None
        if self.stage == 1 and b.reduced_into is not None:
            b.grad_flat[b.shard[0]:b.shard[1]].copy_(b.reduced_into)
            b.reduced_into = None
        if self.stage >= 2 and b.grad_flat is not None:
            b.grad_flat = None
            for p in b.params:
                p.grad = None

    def _free_finished(self):
        """Stages 2-3: release full gradient buffers whose reduce-scatter is done."""
        if self.stage < 2:
            return
        for b in self.buckets:
            if b.launched and b.grad_flat is not None and (b.reduction is None or b.reduction.is_completed()):
                self._complete(b)

    def finish_reduction(self) -> None:
        """After the last backward of the step: launch what the hooks did not (no overlap,
        or gradients set outside backward) and wait for every reduction."""
        self.events.append((time.perf_counter(), "backward_done", -1))
        if self.direct:
            for p in self.params():  # as a bucket's slot would be: zero where none came
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if self.reduces:  # tp: whether this rank's own gradients were finite, then the sums
                for b in self.buckets:
                    b.finite = torch.stack([torch.isfinite(p.grad).all() for p in b.params]).all()
                self.grad_sync(self.params())
            return
        for b in self.buckets:
            if not b.launched:
                if b.grad_flat is None:  # stage 2-3 bucket that received no gradient
                    b.grad_flat = torch.zeros(b.numel, dtype=b.param_shard.dtype, device=b.param_shard.device)
                self._adopt_grads(b)
                self._launch(b)
        for b in self.buckets:  # in bucket order: the cp collectives must match on every cp rank
            self._complete(b)
            if b.cp_part is not None:
                comm.all_gather_into(self.mesh, "cp", b.grad_flat, b.cp_part, tag="grads")
                b.cp_part = None
            elif self.stage >= 1:
                comm.all_reduce(self.mesh, "cp", self._grad_of_shard(b), tag="grads")
        for b in self.buckets:  # one per end, if any: the same call on both
            if any(tied_across_stages(p) for p in b.params):
                comm.all_reduce(self.mesh, "pp_ends", self._grad_of_shard(b), tag="tied_grads")

    def _adopt_grads(self, b: Bucket):
        """Every parameter's gradient in its bucket slot, also for one that received none
        or whose gradient was set outside backward."""
        for i, p in enumerate(b.params):
            self._into_slot(b, i, p)

    def _into_slot(self, b: Bucket, i: int, p: nn.Parameter):
        """p's gradient becomes its slot in the bucket: copied there from a fresh tensor,
        zero if p has none."""
        slot = b.view(b.grad_flat, i)
        if p.grad is None:
            slot.zero_()
        elif p.grad.data_ptr() != slot.data_ptr():
            slot.copy_(p.grad)
        p.grad = slot

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer on this rank's shard (on the host when offloaded), then the
        updated shards gathered into the full parameters (stages 1-2)."""
        if self.direct:
            for piece in self.optimizer_pieces:  # whole parameters: autograd's gradients
                piece.leaf.grad = piece.param.grad.view(-1)[piece.start:piece.stop]
        for b in self.buckets:
            if b.host:
                b.host["grad"].copy_(self._grad_of_shard(b))
        optimizer.step()
        if self.direct:  # the views would keep the gradients alive through the next forward
            for piece in self.optimizer_pieces:
                piece.leaf.grad = None
        for b in self.buckets:
            # ZeRO-3: nothing may stay gathered across the update (a prefetch no unit used
            # would otherwise serve stale values next step).
            self._free_params(b)
            if b.host and b.host["master"] is not b.param_shard:
                b.param_shard.copy_(b.host["master"])
            if self.stage in (1, 2):
                comm.all_gather_into(self.mesh, "dp", b.param_flat, b.param_shard.clone(), tag="params_step")

    # --- ZeRO-3: parameters gathered around each use ------------------------------------

    def _install_gather_hooks(self, units: list[nn.Module]):
        """Each unit gathers the buckets holding its parameters before its forward and
        again before its backward, prefetching the next unit's (forward) or the previous
        one's (backward). A weight two units share (tied embeddings) lies in one bucket
        that both gather."""
        held = []  # (unit, its buckets), forward order
        for unit in units:
            buckets = {self._slot_of[id(p)][0].index: self._slot_of[id(p)][0]
                       for p in unit.parameters() if id(p) in self._slot_of}
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
            self._gather(b, purpose, wait=False)
        for b in ahead:  # prefetch: its all-gather runs while this unit computes
            self._gather(b, purpose, wait=False)
        for b in buckets:
            self._wait_gather(b)
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if self.free_after_input_grad and own and x is not None and x.requires_grad and torch.is_grad_enabled():
            def after_backward(grad, own=own):  # every product reading the weights is done
                for b in own:
                    self._free_params(b)
            x.register_hook(after_backward)

    def _after_forward(self, buckets: list[Bucket], behind: list[Bucket], out):
        for b in buckets:
            self._free_params(b)

        def before_backward(grad, buckets=buckets, behind=behind):
            for b in buckets:
                self._gather(b, "backward", wait=False)
            for b in behind:
                self._gather(b, "backward", wait=False)
            for b in buckets:
                self._wait_gather(b)
        # Every output the backward can enter through (a gathered bucket is not gathered twice).
        for tensor in _tensors_in(out):
            if tensor.requires_grad:
                tensor.register_hook(before_backward)

    def _gather(self, b: Bucket, purpose: str, wait: bool = True):
        exact = purpose == "read"  # to read the values themselves, not to compute with them
        if b.gathered:
            if not (exact and b.rounded):
                return
            self._free_params(b)  # gathered rounded, for compute: a read gathers it again exact
        storage = b.param_flat.untyped_storage()
        storage.resize_(b.numel * b.param_flat.element_size())
        device = b.param_flat.device
        sixteen = None if exact else b.sixteen_bit
        # The shard goes to the device first (from host memory when offloaded: packed there).
        if sixteen is None:
            b.gather_source, b.gather_into = b.param_shard.to(device, copy=True), b.param_flat.data
        else:
            b.gather_source = sixteen.pack(b.param_shard).to(device)
            b.gather_into = torch.empty(sixteen.n * sixteen.width, dtype=sixteen.dtype, device=device)
        b.gather_work = comm.all_gather_into(self.mesh, "dp", b.gather_into, b.gather_source,
                                             tag=f"params_{purpose}", async_op=True)
        b.gathered, b.rounded = True, sixteen is not None
        if wait:
            self._wait_gather(b)

    def _wait_gather(self, b: Bucket):
        if b.gather_work is not None:
            with self.mesh.ledger.waiting("dp", "all_gather", "params"):
                b.gather_work.wait()
            b.gather_work = None
        if b.gather_into is not None and b.rounded:
            b.sixteen_bit.unpack(b.gather_into, b.param_flat.data)
        b.gather_source = b.gather_into = None

    def _free_params(self, b: Bucket):
        if self.stage != 3 or not b.gathered:
            return
        self._wait_gather(b)
        b.param_flat.untyped_storage().resize_(0)
        b.gathered = b.rounded = False

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Context: every bucket's full parameters present (ZeRO-3), e.g. to read them."""
        for b in self.buckets:
            self._gather(b, "read")
        try:
            yield
        finally:
            for b in self.buckets:
                self._free_params(b)

    # --- accounting ---------------------------------------------------------------------

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes held now for parameters, gradients and optimizer states, split into the
        device's and the host's (offloaded) memory. Counted from the tensors themselves."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        device = {"params": 0, "grads": 0, "optimizer": 0}
        host = {"params": 0, "grads": 0, "optimizer": 0}
        for b in self.buckets:
            device["params"] += b.param_flat.untyped_storage().nbytes()
            if self.stage == 3:
                (host if "params" in self.offload else device)["params"] += size(b.param_shard)
            device["grads"] += size(b.grad_flat) + size(b.grad_shard)
            if self.direct:
                device["grads"] += sum(size(p.grad) for p in b.params)
            if b.host:
                if b.host["master"] is not b.param_shard:
                    host["optimizer"] += size(b.host["master"])
                host["grads"] += size(b.host["grad"])
        states = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                     for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
        (host if "optimizer" in self.offload else device)["optimizer"] += states
        device["grads"] += self.reducer.state_bytes()  # error feedback: a gradient's worth
        out = {**device, "total": sum(device.values())}
        out["host"] = {**host, "total": sum(host.values())}
        return out
