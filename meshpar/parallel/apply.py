"""parallelize(): the one place where the parallelisms are composed, in a fixed order.

    1. tensor (and sequence) parallelism: shard the layers over tp
    2. context parallelism: attention cores over cp (the trainer feeds each rank its tokens)
    3. pipeline parallelism: keep this rank's stages (layers split over pp x virtual stages)
    4. torch.compile of the layers this rank holds, if asked (compile.py)
    5. activation recomputation of those layers
    6. data parallelism (ZeRO stages 0-3) wraps the result, over dp: see zero.py; a model
       built on the meta device gets its parameters' storage there, in ZeRO's flat
       buffers, filled for this rank only (under ZeRO-3, only its shard)

The model arrives either built on the meta device (shapes only: steps 1-5 slice shapes,
and step 6 allocates and fills this rank's share, tile by tile, with the reference
initialization's values - meshpar/init.py) or as the full single-device model, and leaves
holding only this rank's slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.model.llama import Transformer
from meshpar.model.loss import cross_entropy_sum
from meshpar.parallel.compile import apply_compile
from meshpar.parallel.context import ContextParallelAttention, local_positions
from meshpar.parallel.dropout import shard_dropouts
from meshpar.parallel.sharding import full_state
from meshpar.parallel.recompute import apply_recompute
from meshpar.parallel.llama_plan import llama_plan
from meshpar.parallel.plan import apply_tensor_plan
from meshpar.pipeline.split import balanced_split, stage_layers_of
from meshpar.pipeline.stages import PipelineStages, shared_by_the_ends, tie_the_ends


@dataclass
class ParallelModel:
    """This rank's part of the model and what training it needs besides forward."""

    module: nn.Module
    mesh: ParallelMesh
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum
    # Sum over tp the gradients partial there; called per gradient bucket before dp.
    grad_syncs: list[Callable[[list[nn.Parameter] | None], None]] = field(default_factory=list)
    num_stages: int = 1  # pipeline stages over all ranks; module is a PipelineStages when above 1
    data_parallel: object = None  # the ShardedDataParallel wrapping `module`, once built

    def local_positions(self, seq_len: int, device=None) -> torch.Tensor | None:
        """Global positions of this rank's tokens under context parallelism (None: all)."""
        cp = self.mesh.size("cp")
        return None if cp == 1 else local_positions(seq_len, cp, self.mesh.index("cp"), device)

    def sync_grads(self, params: list[nn.Parameter] | None = None):
        for sync in self.grad_syncs:
            sync(params)

    @property
    def pipelined(self) -> bool:
        return self.num_stages > 1

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Parameters (or gradients) gathered back to full shape and to every stage
        (collective over tp and pp). Under ZeRO-2/3 only parameters: the gradients are
        sharded over dp."""
        zero = self.data_parallel
        if zero is not None and zero.stage >= 2 and grads:
            raise ValueError("full gradients do not exist under ZeRO stage 2-3 (sharded over dp)")
        if zero is not None and zero.stage == 3:
            with zero.gathered():
                state = full_state(self.module, self.mesh, grads)
        else:
            state = full_state(self.module, self.mesh, grads)
        if self.mesh.size("pp") > 1:
            merged = {}
            for part in comm.all_gather_object(self.mesh, state, tag="gather_full", axis="pp"):
                merged.update(part)
            state = merged
        return state


def parallelize(model: Transformer, mesh: ParallelMesh, sequence_parallel: bool = False,
                num_stages: int = 1, stage_layer_counts: list[int] | None = None,
                recompute: str = "none", recompute_every: int = 1, cp_impl: str = "ring",
                compile_layers: bool = False) -> ParallelModel:
    """Shard `model` (the full seeded reference) for this rank of `mesh`. `num_stages` is
    pp x virtual stages; `stage_layer_counts` fixes the layers per stage (default: balanced);
    `recompute` is none, full or selective (full: every `recompute_every`-th layer);
    `cp_impl` is ring or all-to-all attention over cp; `compile_layers` compiles each
    transformer block with torch.compile. A model on the meta device stays there (ZeRO's
    wrapper gives it storage)."""
    parallel = ParallelModel(model, mesh)
    plan = llama_plan(model.cfg)
    if mesh.size("tp") > 1:
        tp = apply_tensor_plan(model, plan, mesh, sequence_parallel)
        parallel.loss_sum = tp.loss_sum
        parallel.grad_syncs.append(tp.sync_grads)
    if mesh.size("cp") > 1:
        attend = ContextParallelAttention(mesh, cp_impl)
        for layer in model.layers:
            layer.attention.attend = attend
    shard_dropouts(list(model.layers), model.cfg.dropout, mesh, sequence_parallel)
    if num_stages > 1:
        counts = stage_layer_counts or balanced_split(model.cfg, num_stages)
        ranges = stage_layers_of(counts)
        p, r = mesh.size("pp"), mesh.index("pp")
        seq_shards = mesh.size("tp") if sequence_parallel else 1
        parallel.module = PipelineStages(model, plan.pipeline, {s: ranges[s] for s in range(r, num_stages, p)},
                                         num_stages, seq_shards)
        parallel.num_stages = num_stages
        tie_the_ends(model, shared_by_the_ends(model, plan.pipeline), mesh)  # a tied embedding: one weight, two stages
    held = parallel.module.layers
    if compile_layers:
        apply_compile(list(held.children()))
    apply_recompute({int(name): layer for name, layer in held.named_children()}, recompute, recompute_every)
    return parallel
