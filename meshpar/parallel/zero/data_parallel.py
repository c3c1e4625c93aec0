"""ShardedDataParallel: data parallelism over dp at ZeRO stage 0-3, put together from
the flat buckets (buckets.py), the gradients' reduction (reduction.py), ZeRO-3's
gathering (gathering.py) and offload (offload.py)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.init import Materialization, fill_flat
from meshpar.init import materialize as materialize_rest
from meshpar.mesh import ParallelMesh
from meshpar.parallel.grad_reduce import GradReducer
from meshpar.parallel.sharding import model_names, sharded_over, tied_across_stages
from meshpar.parallel.zero.buckets import Bucket, allocate, group_parameters, units_of
from meshpar.parallel.zero.gathering import ParameterGathering
from meshpar.parallel.zero.offload import HostOffload
from meshpar.parallel.zero.options import STAGES
from meshpar.parallel.zero.reduction import GradientReduction, mixes_ranks, sums_cp_parts


@dataclass
class OptimizerPiece:
    """One optimizer leaf: elements [start, stop) of `param`'s flattened local tensor,
    this rank's share of it (all of it below ZeRO-1)."""

    param: nn.Parameter
    start: int
    stop: int
    leaf: nn.Parameter  # what the optimizer steps; its state is keyed by it


class ShardedDataParallel:
    """Data parallelism over the mesh's dp axis at ZeRO stage 0-3 (see the package
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
        self.grad_sync = grad_sync or (lambda params: None)
        self.reducer = reducer or GradReducer(mesh)
        self.n, self.cp = mesh.size("dp"), mesh.size("cp")
        self.reduces = mixes_ranks(mesh)
        # Nothing to reduce over dp or cp - one rank on each, stage 0, nothing offloaded, no
        # weight tied across stages: a bucket would only copy each gradient once more. The
        # gradients stay where autograd accumulates them, as in a plain PyTorch loop, and
        # the few that are partial over tp are summed once backward is done. They live from
        # backward to the next step's `zero_grad`, not through its forward: 4 bytes per
        # parameter less at the activations' peak (one micro-batch, no pipeline).
        self.direct = (stage == 0 and self.n == 1 and self.cp == 1 and not offload
                       and not any(tied_across_stages(p) for p in module.parameters()))
        units = units_of(module)
        # A model built on the meta device gets its parameters' storage here, in the flat
        # buffers, and filled there: under ZeRO-3 only this rank's shard is ever drawn.
        names = {id(p): name for name, p in model_names(module)} if materialize else {}

        def fill(out: torch.Tensor, p: nn.Parameter, start: int) -> None:
            if materialize.fill is not None:  # none: a checkpoint will be loaded
                fill_flat(out, p, materialize.mesh, names[id(p)], start, materialize.fill)

        # Experts split over ep are data parallel over edp only: their buckets see the mesh
        # with edp as its dp, and reduce, shard and gather there.
        meshes = {"dp": (mesh, self.reducer)}
        if mesh.size("ep") > 1:
            experts = mesh.data_parallel_over("edp")
            meshes["edp"] = (experts, self.reducer.over(experts))
        cp_factor = self.cp if sums_cp_parts(stage, mesh) else 1
        self.buckets: list[Bucket] = []
        for i, params in enumerate(group_parameters(units, bucket_bytes, one_unit_each=stage == 3)):
            where, reducer = meshes["edp" if sharded_over(params[0], "ep") else "dp"]
            bucket = allocate(i, params, align=reducer.alignment(stage >= 1) * cp_factor, ranks=where.size("dp"),
                              rank=where.index("dp"), stage=stage, device=materialize.device if materialize else None,
                              shard_home="cpu" if "params" in self.offload else None, fill=fill, direct=self.direct)
            bucket.mesh, bucket.reducer = where, reducer
            self.buckets.append(bucket)
        self.reducers = [reducer for _, reducer in meshes.values()]
        self._slot_of = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self.host = HostOffload(self.buckets, stage) if "optimizer" in self.offload else None
        self.gathering = ParameterGathering(module, units, self.buckets, mesh, self._slot_of, compute_dtype) \
            if stage == 3 else None
        self.reduction = None if self.direct else GradientReduction(
            self.buckets, mesh, stage, self.reducer, overlap, microbatches, self.grad_sync, self._slot_of,
            unit_done=self.gathering.free if self.gathering else None)
        self._direct_finite: list[torch.Tensor] = []  # direct: this rank's own gradients were finite
        self.optimizer_pieces: list[OptimizerPiece] = []  # filled by optimizer_params()
        if materialize is not None:  # what no bucket holds (frozen parameters) on its own; buffers moved
            materialize_rest(module, materialize.mesh, materialize.device, materialize.fill)

    # What the trainer and the pipeline set or read of the pieces.

    @property
    def deferred(self) -> frozenset[int]:
        """Ids of the parameters whose gradients a zero-bubble W computes."""
        return self.reduction.deferred if self.reduction else frozenset()

    @deferred.setter
    def deferred(self, ids: frozenset[int]) -> None:
        if self.reduction:
            self.reduction.deferred = ids

    @property
    def free_after_input_grad(self) -> bool:
        """ZeRO-3: free a unit's parameters once its input gradient is done (gathering.py)."""
        return bool(self.gathering and self.gathering.free_after_input_grad)

    @free_after_input_grad.setter
    def free_after_input_grad(self, value: bool) -> None:
        if self.gathering:
            self.gathering.free_after_input_grad = value

    @property
    def events(self) -> list[tuple[float, str, int]]:
        """(time, what, bucket) of this step's reductions: the overlap trace."""
        return self.reduction.events if self.reduction else []

    # --- the parameters and their gradients --------------------------------------------

    def params(self) -> list[nn.Parameter]:
        """The parameters it manages, bucket by bucket."""
        return [p for b in self.buckets for p in b.params]

    def _master(self, b: Bucket) -> torch.Tensor:
        return self.host.master[b.index] if self.host else b.param_shard

    def optimizer_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(decayed, undecayed) leaf tensors for the optimizer: each parameter's piece of
        this rank's shard, aliasing the master shard, with `.grad` aliasing its gradient.
        Matrices are decayed, vectors (norm gains) not - as the whole parameter would be."""
        decayed, undecayed = [], []
        self.optimizer_pieces = []
        for b in self.buckets:
            master = self._master(b)
            grad = None if self.direct else self.host.grad[b.index] if self.host else self.reduction.reduced(b)
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
                    if self._master(b) is not b.param_shard:
                        self._master(b)[lo - lo_shard:hi - lo_shard].copy_(mine)

    def produced_nonfinite(self) -> bool:
        """Whether this rank's own gradients (before reduction) held a NaN or Inf."""
        if not self.reduces:  # the gradients are still this rank's own
            return any(not bool(torch.isfinite(g).all()) for g in self.grads())
        flags = self._direct_finite if self.direct else [p.finite for p in self.reduction.of.values()]
        return any(f is not None and not bool(f) for f in flags)

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, gradient piece) for every piece this rank owns after reduction."""
        if self.direct:
            return [(p, p.grad.view(-1)) for p in self.params()]
        return [(p, self.reduction.reduced(b)[part]) for b in self.buckets for p, part in b.owned()]

    def grads(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shards (for unscaling and clipping)."""
        if self.direct:
            return [p.grad for p in self.params()]
        return [self.reduction.reduced(b) for b in self.buckets]

    @property
    def grads_sharded(self) -> bool:
        return self.stage >= 1

    # --- a step -----------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Start a step: no gradient accumulated, no reduction launched."""
        if self.reduction:
            self.reduction.zero_grad()
        else:
            for p in self.params():
                p.grad = None

    def finish_reduction(self) -> None:
        """After the last backward of the step: launch what the hooks did not (no overlap,
        or gradients set outside backward) and wait for every reduction."""
        if self.reduction:
            self.reduction.finish()
            if self.reducer.compression == "int8" and self.mesh.size("tp") > 1:
                self._tp_replicas_agree()
            return
        for p in self.params():  # as a bucket's slot would be: zero where none came
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.reduces:  # tp: whether this rank's own gradients were finite, then the sums
            self._direct_finite = [torch.stack([torch.isfinite(p.grad).all() for p in b.params]).all()
                                   for b in self.buckets]
            self.grad_sync(self.params())

    @torch.no_grad()
    def _tp_replicas_agree(self) -> None:
        """int8 scales each block of a bucket by its largest value, and a block mixes a
        tp-replicated parameter's gradient (a norm gain) with tp-sharded neighbours that
        differ per tp rank: the replicas' reduced gradients then differ by the rounding,
        and the replicas drift apart. The tp ranks' buckets lie out alike, so each such
        piece is averaged over tp in place - one small all-reduce of the replicated pieces."""
        pieces = [g for p, g in self.grad_pieces() if g.numel() and not sharded_over(p, "tp")]
        if pieces:
            flat = comm.all_reduce(self.mesh, "tp", torch.cat(pieces), tag="tp_replica_grads")
            flat /= self.mesh.size("tp")
            torch._foreach_copy_(pieces, list(flat.split([g.numel() for g in pieces])))

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer on this rank's shard (on the host when offloaded), then the
        updated shards gathered into the full parameters (stages 1-2)."""
        if self.direct:
            for piece in self.optimizer_pieces:  # whole parameters: autograd's gradients
                piece.leaf.grad = piece.param.grad.view(-1)[piece.start:piece.stop]
        if self.host:
            for b in self.buckets:
                self.host.before_step(b, self.reduction.reduced(b))
        optimizer.step()
        if self.direct:  # the views would keep the gradients alive through the next forward
            for piece in self.optimizer_pieces:
                piece.leaf.grad = None
        for b in self.buckets:
            # ZeRO-3: nothing may stay gathered across the update (a prefetch no unit used
            # would otherwise serve stale values next step).
            if self.gathering:
                self.gathering.free(b)
            if self.host:
                self.host.after_step(b)
            if self.stage in (1, 2):
                comm.all_gather_into(b.mesh, "dp", b.param_flat, b.param_shard.clone(), tag="params_step")

    def gathered(self) -> AbstractContextManager[None]:
        """Context: every bucket's full parameters present (ZeRO-3), e.g. to read them."""
        return self.gathering.gathered() if self.gathering else nullcontext()

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
            if self.host:
                if self._master(b) is not b.param_shard:
                    host["optimizer"] += size(self._master(b))
                host["grads"] += size(self.host.grad[b.index])
        states = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                     for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
        (host if "optimizer" in self.offload else device)["optimizer"] += states
        device["grads"] += sum(r.state_bytes() for r in self.reducers)  # error feedback: a gradient's worth
        out = {**device, "total": sum(device.values())}
        out["host"] = {**host, "total": sum(host.values())}
        return out
