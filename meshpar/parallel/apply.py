"""split_model(): the layout half of the one composition path, for every model with a
`Plan`, in a fixed order (`meshpar.parallelize` then adds data parallelism):

    1. tensor (and sequence) parallelism: shard the plan's layers over tp; expert
       parallelism: each rank its share of the experts, over ep
    2. context parallelism: the plan's attention cores over cp (the caller feeds each
       rank its tokens: `local_positions`)
    3. dropout on split tokens: the whole sequence's mask, this rank's rows of it
    4. torch.compile of the chosen modules (compile.py)
    5. activation recomputation, around the compiled forwards (the checkpoint stays eager)
    6. pipeline parallelism: keep this rank's stages (blocks split over pp x virtual
       stages); a weight tied across the first and the last stage keeps a copy on each

The model arrives built on the meta device (shapes only: every step slices shapes, and
ZeRO's wrapper then allocates and fills this rank's share, tile by tile, with the
reference initialization's values - meshpar/init.py) or as the full single-device
model, and leaves holding only this rank's slices of it.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.parallel.compile import apply_compile
from meshpar.parallel.context import ContextParallelAttention, local_positions
from meshpar.parallel.dropout import shard_dropouts
from meshpar.parallel.experts import split_experts
from meshpar.parallel.llama_plan import llama_plan
from meshpar.parallel.plan import Plan, TensorParallelism, apply_tensor_plan, regions_of
from meshpar.parallel.recompute import POLICIES, recompute_attention, recompute_modules
from meshpar.parallel.sharding import full_state
from meshpar.pipeline.split import balanced_split, stage_costs, stage_layers_of
from meshpar.pipeline.stages import PipelineStages, shared_by_the_ends, tie_the_ends


@dataclass
class ParallelModel:
    """This rank's part of the model, and what its forward and loss need besides it."""

    module: nn.Module  # a PipelineStages when num_stages is above 1
    mesh: ParallelMesh
    plan: Plan
    tensor_parallel: TensorParallelism
    num_stages: int = 1  # pipeline stages over all ranks
    stage_counts: list[int] | None = None  # blocks per stage, every stage's (pp above 1)
    module_order: dict[str, int] = field(default_factory=dict)  # the whole model's modules, in forward order
    compiled: list[str] = field(default_factory=list)  # the modules run compiled

    @property
    def pipelined(self) -> bool:
        return self.num_stages > 1

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross entropy (vocab-parallel when the output layer is split)."""
        return self.tensor_parallel.loss_sum(logits, targets)

    def sync_grads(self, params: list[nn.Parameter] | None = None) -> None:
        """Sum over tp the gradients partial there; called per bucket before dp's reduction."""
        self.tensor_parallel.sync_grads(params)

    def attention_cores(self) -> list[nn.Module]:
        """The plan's attention modules this rank holds (each `attend(q, k, v)` is its
        causal core)."""
        return [m for _, m in named_matching(self.module, [self.plan.attention])] if self.plan.attention else []

    def local_positions(self, seq_len: int, device=None) -> torch.Tensor | None:
        """Global positions of this rank's tokens under context parallelism (None: all)."""
        cp = self.mesh.size("cp")
        return None if cp == 1 else local_positions(seq_len, cp, self.mesh.index("cp"), device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of an unpipelined model: `positions` (context parallelism's, or each
        sequence's (b, s) in generation) passed under the plan's keyword; a model returning an output object (transformers') gives its
        `.logits`."""
        if positions is not None and positions.dim() == 1 and self.plan.positions_batched:
            positions = positions.unsqueeze(0)
        out = self.module(tokens, **({self.plan.positions: positions} if positions is not None else {}))
        return out if torch.is_tensor(out) else out.logits

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Parameters (or gradients) gathered back to full shape and to every stage
        (collective over tp and pp; under ZeRO-3 call it inside `gathered()`)."""
        state = full_state(self.module, self.mesh, grads)
        if self.mesh.size("pp") > 1:
            merged = {}
            for part in comm.all_gather_object(self.mesh, state, tag="gather_full", axis="pp"):
                merged.update(part)
            state = merged
        return state


def split_model(model: nn.Module, mesh: ParallelMesh, plan: Plan | None = None, *, sequence_parallel: bool = False,
                num_stages: int = 1, stage_layer_counts: list[int] | None = None, cp_impl: str = "ring",
                compile: bool | list[str] = False, recompute: str | list[str] = "none",
                recompute_every: int = 1) -> ParallelModel:
    """Split `model` by `plan` (default: meshpar's Llama's, `llama_plan`) for this rank
    of `mesh`, in the order above. `num_stages` is pp x virtual stages, with
    `stage_layer_counts` blocks each (default: balanced by the blocks' weights, the last
    stage also paying for its output layer). `cp_impl`: ring or all-to-all attention over
    cp. `compile`: True for every block, or module-name patterns (fnmatch). `recompute`:
    none; full (every `recompute_every`-th block); selective (the attention cores); or
    module-name patterns, each module recomputed whole. Every option is checked before
    the model changes (ValueError)."""
    plan = plan or llama_plan(model.cfg)
    blocks = plan.block_list()
    compiled = _chosen(model, "compile", [f"{blocks}.*"] if compile is True else list(compile or []))
    recomputed = _chosen(model, "recompute", _recompute_patterns(model, plan, recompute, recompute_every))
    if (mesh.size("cp") > 1 or recompute == "selective") and not plan.attention:
        raise ValueError("context parallelism and selective recomputation need the plan's `attention`: the "
                         "modules whose attend(q, k, v) method is the causal attention core")
    if mesh.size("cp") > 1 and not (plan.pipeline.block_args if num_stages > 1 else plan.positions):
        raise ValueError("context parallelism gives each rank tokens from two places of the sequence, and the "
                         "model must know where: the plan's `positions` (the keyword of the model's forward) "
                         "or, in a pipeline, its `pipeline.block_args` (the blocks' arguments from positions)")
    if num_stages > 1:
        counts = _stage_counts(model, plan, num_stages, stage_layer_counts)
        ends = shared_by_the_ends(model, plan.pipeline)

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # the order forward runs them in
    tensor_parallel = apply_tensor_plan(model, plan, mesh, sequence_parallel)  # 1; may replace modules
    if mesh.size("ep") > 1 and not plan.experts:
        raise ValueError("ep above 1 needs the plan's `experts`: the mixture-of-experts modules to split")
    if plan.experts:  # 1b: this rank's experts (under ep), tokens routed to them by all-to-all
        split_experts(model, plan.experts, mesh)
    if mesh.size("cp") > 1:  # 2
        attend = ContextParallelAttention(mesh, cp_impl)
        for _, attention in named_matching(model, [plan.attention]):
            attention.attend = attend
        # a mixture of experts' load-balancing loss counts per sequence: the parts' counts summed
        for layer in (m for m in model.modules() if hasattr(m, "sum_over_sequence_parts")):
            layer.sequence_parts = mesh.size("cp")
            layer.sum_over_sequence_parts = functools.partial(_sum_over_cp, mesh)
    if blocks is not None:  # 3
        shard_dropouts(model, blocks, [name for name, _ in regions_of(model, plan)], mesh, sequence_parallel)
    apply_compile([model.get_submodule(name) for name in compiled])  # 4; by name: step 1 replaced modules
    recompute_modules([model.get_submodule(name) for name in recomputed])  # 5
    if recompute == "selective":
        recompute_attention([m for _, m in named_matching(model, [plan.attention])])
    parallel = ParallelModel(model, mesh, plan, tensor_parallel, num_stages, module_order=order, compiled=compiled)
    if num_stages > 1:  # 6; rank r holds stages r, r + pp, ...
        ranges = stage_layers_of(counts)
        p, r = mesh.size("pp"), mesh.index("pp")
        seq_shards = mesh.size("tp") if sequence_parallel else 1
        tie_the_ends(model, ends, mesh)
        parallel.stage_counts = counts
        parallel.module = PipelineStages(model, plan.pipeline, {s: ranges[s] for s in range(r, num_stages, p)},
                                         num_stages, seq_shards)
    return parallel


def _sum_over_cp(mesh: ParallelMesh, counts: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce(mesh, "cp", counts.detach().clone(), tag="moe_counts")


def named_matching(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules whose names match one of the fnmatch `patterns`."""
    return [(n, m) for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _chosen(model: nn.Module, option: str, patterns: list[str]) -> list[str]:
    """The names of the outermost modules `patterns` match (module names hold no
    wildcards, so they serve as patterns again); ValueError when there are patterns but
    none matches."""
    found = []
    for name, _ in named_matching(model, patterns):  # the outermost only: "h.*" means the blocks, not their insides
        if not any(name.startswith(outer + ".") for outer in found):
            found.append(name)
    if patterns and not found:
        raise ValueError(f"{option}={list(patterns)} matches no module of the model; name modules as "
                         f"named_modules() does, e.g. the blocks' 'layers.*'")
    return found


def _recompute_patterns(model: nn.Module, plan: Plan, recompute: str | list[str], every: int) -> list[str]:
    if not isinstance(recompute, str):
        return list(recompute)
    if recompute not in POLICIES:
        raise ValueError(f"unknown recompute policy {recompute!r}; choose one of {', '.join(POLICIES)}, "
                         f"or module-name patterns")
    if recompute != "full":
        return []
    count = len(model.get_submodule(plan.block_list()))
    return [f"{plan.block_list()}.{i}" for i in range(count) if (i + 1) % every == 0]


def _stage_counts(model: nn.Module, plan: Plan, num_stages: int, given: list[int] | None) -> list[int]:
    if plan.pipeline is None:
        raise ValueError("pp > 1 needs the plan's `pipeline` part (PipelinePlan)")
    blocks = len(model.get_submodule(plan.pipeline.blocks))
    if blocks < num_stages:
        raise ValueError(f"{blocks} blocks cannot fill {num_stages} pipeline stages (pp x virtual_stages)")
    if given is not None:
        if len(given) != num_stages or sum(given) != blocks or min(given) < 1:
            raise ValueError(f"stage_layer_counts={given}: {num_stages} counts of at least 1, summing to the "
                             f"{blocks} blocks")
        return list(given)
    return balanced_split(*stage_costs(model, plan.pipeline), num_stages)
