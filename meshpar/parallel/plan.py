"""Plans: tensor and pipeline parallelism for a model meshpar did not write, from a map of
its module names to parallel styles - no edit to the model.

    column            nn.Linear split by output features; {name: k} for k fused outputs
                      (q, k, v in one projection: each of the k parts is split, so rank r
                      holds its heads of each); bias split alike
    row               nn.Linear split by input features; partial outputs summed over tp,
                      then the bias added once
    vocab_embedding   nn.Embedding split by rows (vocabulary)
    vocab_output      the output nn.Linear split by vocabulary; the loss is the
                      vocab-parallel cross entropy (the full logits are never gathered)
    divide_by_tp      attributes divided by tp (an attention's head count)
    pipeline          the model as first modules + embed(), a ModuleList of blocks,
                      last modules + head(): stages are runs of blocks
    blocks            the ModuleList of transformer blocks (or the pipeline's): where
                      sequence parallelism shards the sequence
    tp_regions        the modules that each hold a column-to-row pair (an attention,
                      an MLP): sequence parallelism's all-gather and reduce-scatter points

Names are `fnmatch` patterns over `named_modules()`.

Sequence parallelism (Korthikanti et al. 2022) over a plan: the first block receives
this rank's 1/tp of the sequence and the last block's output is gathered whole again;
in between, each tp region all-gathers its input along the sequence and reduce-scatters
its output - the same bytes as tensor parallelism's all-reduces - and the rest of the
blocks (norms, residual adds, dropout) runs on 1/tp of the tokens. A region sees the
whole sequence, so it may mix tokens (the attention core) and read the sequence length
from its input; outside the regions a block must work token by token. The blocks'
replicated parameters (norm gains, row biases) then see 1/tp of the tokens, and their
gradients are summed over tp. An `nn.Dropout` between regions draws the mask of the whole
sequence and keeps its rows (meshpar/parallel/dropout.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshpar.mesh import ParallelMesh
from meshpar.parallel.dropout import ShardedDropout
from meshpar.parallel.sharding import FUSED_ATTR, SPEC_ATTR, ShardSpec
from meshpar.parallel.tensor import (bracket, copy_to_tensor_parallel, gather_to_replicated, on_first_input, on_output,
                                     reduce_from_tensor_parallel, scatter_to_sequence_parallel)


@dataclass
class PipelinePlan:
    """The model as a pipeline: `first` modules and `embed(model, tokens) -> hidden` on
    the first stage, the blocks of the ModuleList `blocks` (each `block(hidden) ->
    hidden`) spread over the stages, `last` modules and `head(model, hidden) -> logits`
    on the last stage. `hidden_size` is the width of what passes between stages."""

    blocks: str
    first: list[str]
    last: list[str]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    hidden_size: int


@dataclass
class Plan:
    """Module-name patterns (fnmatch over `named_modules()`) mapped to parallel styles:

    - column: nn.Linear split by output features; {pattern: k} for k fused outputs (q, k,
      v in one projection: each part is split, so a rank holds its heads of each);
    - row: nn.Linear split by input features, partial outputs summed, the bias added once;
    - vocab_embedding: nn.Embedding split by vocabulary rows;
    - vocab_output: the output nn.Linear split by vocabulary, with the vocab-parallel
      cross entropy (the full logits are never gathered);
    - divide_by_tp: attributes divided by tp (an attention's head count);
    - pipeline: a PipelinePlan, for pp > 1;
    - blocks: the ModuleList of transformer blocks, for sequence parallelism (without
      it, the pipeline's);
    - tp_regions: the modules holding a column-to-row pair, for sequence parallelism."""

    column: dict[str, int] | list[str] = field(default_factory=dict)
    row: list[str] = field(default_factory=list)
    vocab_embedding: list[str] = field(default_factory=list)
    vocab_output: str | None = None
    divide_by_tp: dict[str, list[str]] = field(default_factory=dict)
    pipeline: PipelinePlan | None = None
    blocks: str | None = None
    tp_regions: list[str] = field(default_factory=list)

    def columns(self) -> dict[str, int]:
        """The column patterns with their fused-part counts."""
        return dict.fromkeys(self.column, 1) if isinstance(self.column, list) else dict(self.column)

    def block_list(self) -> str | None:
        """The name of the ModuleList of blocks: `blocks`, else the pipeline's."""
        return self.blocks or (self.pipeline.blocks if self.pipeline else None)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _param(local: torch.Tensor, spec: ShardSpec | None = None, fused: int = 1) -> nn.Parameter:
    param = nn.Parameter(local.detach().clone().contiguous())
    if spec is not None:
        setattr(param, SPEC_ATTR, spec)
    if fused > 1:
        setattr(param, FUSED_ATTR, fused)
    return param


class ColumnLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split by output features (each of `fused` parts
    split on its own); x is replicated on the tp ranks (inside a sequence-parallel tp
    region, `enter` False, the region has gathered it)."""

    matmul_params = ("weight", "bias")  # read only through F.linear (param_gather.py)

    def __init__(self, linear: nn.Linear, mesh: ParallelMesh, fused: int = 1):
        super().__init__()
        t, r = mesh.size("tp"), mesh.index("tp")
        self.mesh, self.enter = mesh, True
        rows = linear.out_features
        if rows % (fused * t):
            raise ValueError(f"{rows} output features do not split into {fused} parts over tp={t}")

        def split(tensor):
            return torch.cat([part.chunk(t)[r] for part in tensor.chunk(fused)])
        spec = ShardSpec.even("tp", 0, rows, t)
        self.weight = _param(split(linear.weight), spec, fused)
        self.bias = None if linear.bias is None else _param(split(linear.bias), spec, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output features of the full input."""
        return F.linear(copy_to_tensor_parallel(x, self.mesh) if self.enter else x, self.weight, self.bias)


class RowLinear(nn.Module):
    """y = sum over tp of x_local W_local^T, plus the bias once; W split by input features.
    Inside a sequence-parallel tp region (`leave` False) the partial sums go out as they
    are, tp rank 0's with the bias, and the region reduce-scatters them."""

    matmul_params = ("weight",)  # the bias is added in fp32 outside a region

    def __init__(self, linear: nn.Linear, mesh: ParallelMesh):
        super().__init__()
        t, r = mesh.size("tp"), mesh.index("tp")
        if linear.in_features % t:
            raise ValueError(f"{linear.in_features} input features do not split over tp={t}")
        self.mesh, self.leave = mesh, True
        self.weight = _param(linear.weight.chunk(t, dim=1)[r], ShardSpec.even("tp", 1, linear.in_features, t))
        self.bias = None if linear.bias is None else _param(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full output from this rank's input features."""
        if not self.leave:
            return F.linear(x, self.weight, self.bias if self.mesh.index("tp") == 0 else None)
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.mesh)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """Rows [start, start + rows) of the table on each tp rank; partial lookups summed."""

    def __init__(self, embedding: nn.Embedding, mesh: ParallelMesh):
        super().__init__()
        t, r = mesh.size("tp"), mesh.index("tp")
        vocab = embedding.num_embeddings
        if vocab % t:
            raise ValueError(f"a vocabulary of {vocab} does not split over tp={t}")
        self.mesh, self.start = mesh, r * vocab // t
        self.weight = _param(embedding.weight.chunk(t)[r], ShardSpec.even("tp", 0, vocab, t))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full embeddings, each looked up on the rank owning its row."""
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(x, self.mesh)


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def shared_weights(model: nn.Module) -> list[list[str]]:
    """The parameters that several modules share (a tied embedding and output layer),
    each as its places `module.attr`, in the model's order."""
    places: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            places.setdefault(id(p), []).append(f"{module_name}.{attr}" if module_name else attr)
    return [names for names in places.values() if len(names) > 1]


def _split_of(module_name: str, plan: Plan) -> tuple[str, int] | None:
    """How the plan cuts a module's weight: by rows into k fused parts, by columns, or
    not at all (None)."""
    columns = plan.columns()
    if _matches(module_name, columns):
        return ("rows", columns[_which(module_name, columns)])
    if module_name == plan.vocab_output or _matches(module_name, plan.vocab_embedding):
        return ("rows", 1)
    if _matches(module_name, plan.row):
        return ("columns", 1)
    return None


def apply_tensor_plan(model: nn.Module, plan: Plan, mesh: ParallelMesh) -> dict:
    """Replace the planned modules by their tp-parallel versions, in place. Returns what
    the loss needs: {"vocab_start", "vocab_local"} when the output is vocab-parallel.
    A weight shared by modules the plan cuts alike (a tied embedding and vocab-parallel
    output layer) stays one parameter; one they would cut differently is refused
    (ValueError) before the model is touched."""
    if mesh.size("tp") == 1:
        return {}
    shared = shared_weights(model)
    for places in shared:
        splits = {_split_of(place.rpartition(".")[0], plan) for place in places}
        if len(splits) > 1:
            raise ValueError(f"{' and '.join(places)} share one weight, but the plan splits them differently; "
                             f"plan both alike (vocab_embedding with vocab_output) or untie them")
    t = mesh.size("tp")
    columns = plan.columns()
    found = set()
    for name, module in list(model.named_modules()):
        for patterns, build in ((columns, lambda m, n: ColumnLinear(m, mesh, columns[_which(n, columns)])),
                                (plan.row, lambda m, n: RowLinear(m, mesh)),
                                (plan.vocab_embedding, lambda m, n: VocabEmbedding(m, mesh))):
            if name and _matches(name, patterns):
                _set(model, name, build(module, name))
                found.add(name)
        if name and _matches(name, plan.divide_by_tp):
            for attr in next(v for p, v in plan.divide_by_tp.items() if fnmatch.fnmatchcase(name, p)):
                value = getattr(module, attr)
                if value % t:
                    raise ValueError(f"{name}.{attr}={value} does not divide by tp={t}")
                setattr(module, attr, value // t)
    out = {}
    if plan.vocab_output:
        head = model.get_submodule(plan.vocab_output)
        _set(model, plan.vocab_output, ColumnLinear(head, mesh))
        out = {"vocab_start": mesh.index("tp") * head.out_features // t, "vocab_local": head.out_features // t}
        found.add(plan.vocab_output)
    if not found:
        raise ValueError("the plan matched no module of the model: check its names against named_modules()")
    for places in shared:  # each module got its own copy of its cut: one parameter again
        weight = model.get_parameter(places[0])
        for place in places[1:]:
            module_name, _, attr = place.rpartition(".")
            setattr(model.get_submodule(module_name), attr, weight)
    return out


def _regions(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    name = plan.block_list()
    return [(n, m) for n, m in model.named_modules() if n.startswith(name + ".") and _matches(n, plan.tp_regions)]


def check_sequence_parallel(model: nn.Module, plan: Plan) -> None:
    """ValueError unless the plan names the blocks and tp regions inside them, each
    region holding a column and a row layer of the plan (checked on the model as given,
    before any change)."""
    name = plan.block_list()
    if name is None or not plan.tp_regions:
        raise ValueError("sequence_parallel needs the plan's blocks and tp regions: Plan(blocks='h', "
                         "tp_regions=['h.*.attn', 'h.*.mlp']) - the ModuleList of transformer blocks (or the "
                         "pipeline's) and the modules that each hold a column-to-row pair")
    regions = _regions(model, plan)
    if not regions:
        raise ValueError(f"tp_regions={plan.tp_regions} matches no module inside the blocks {name!r}")
    for region_name, region in regions:
        inside = [f"{region_name}.{n}" if n else region_name for n, _ in region.named_modules()]
        for patterns, label in ((plan.columns(), "column"), (plan.row, "row")):
            if not any(_matches(n, patterns) for n in inside):
                raise ValueError(f"sequence_parallel: tp region {region_name} holds no {label} layer of the plan")
    # A split layer between regions would see only this rank's tokens, and a row layer
    # there would add up partial sums of different tokens.
    for n, _ in model.named_modules():
        if (n.startswith(name + ".") and _matches(n, [*plan.columns(), *plan.row])
                and not any(n.startswith(r + ".") for r, _ in regions)):
            raise ValueError(f"sequence_parallel: {n} is split over tp but lies in no tp region; "
                             f"add the module holding it to tp_regions")


def apply_sequence_parallel(model: nn.Module, plan: Plan, mesh: ParallelMesh) -> list[nn.Parameter]:
    """Sequence parallelism over the plan's blocks (see the module docstring), in place,
    after `check_sequence_parallel` and `apply_tensor_plan`. Returns the blocks'
    replicated parameters, whose gradients must be summed over tp."""
    blocks, regions = model.get_submodule(plan.block_list()), _regions(model, plan)
    for _, region in regions:
        for module in region.modules():
            if isinstance(module, ColumnLinear):
                module.enter = False
            elif isinstance(module, RowLinear):
                module.leave = False
        bracket(region, mesh, sequence_parallel=True)
    # A dropout between regions sees this rank's tokens only: it draws the whole sequence's
    # mask and keeps its rows, as one device would (inside a region it sees them all).
    for name, module in list(model.named_modules()):
        if (type(module) is nn.Dropout and module.p > 0 and name.startswith(plan.block_list() + ".")
                and not any(name.startswith(r + ".") for r, _ in regions)):
            _set(model, name, ShardedDropout(module.p, mesh, sequence_parallel=True, like_torch=True))
    on_first_input(blocks[0], lambda x: scatter_to_sequence_parallel(x, mesh))
    on_output(blocks[-1], lambda y: gather_to_replicated(y, mesh))
    return [p for p in blocks.parameters() if not hasattr(p, SPEC_ATTR)]


def _which(name: str, patterns: dict[str, int]) -> str:
    return next(p for p in patterns if fnmatch.fnmatchcase(name, p))


def gather_fused(full_chunks: torch.Tensor, parts: int, tp: int) -> torch.Tensor:
    """Undo a fused column split: the ranks' locals, concatenated in rank order, back into
    [part 0 of every rank, part 1 of every rank, ...]."""
    per_rank = full_chunks.chunk(tp)
    return torch.cat([rank_local.chunk(parts)[k] for k in range(parts) for rank_local in per_rank])


class PlannedStages(nn.Module):
    """The stages one rank holds of a planned model, under the model's parameter names,
    with the interface the pipeline runtime drives: forward_stage(stage, x)."""

    def __init__(self, model: nn.Module, pipeline: PipelinePlan, stage_blocks: dict[int, range], num_stages: int):
        super().__init__()
        self.pipeline, self.stage_blocks, self.num_stages = pipeline, stage_blocks, num_stages
        blocks = model.get_submodule(pipeline.blocks)
        if 0 in stage_blocks:
            for name in pipeline.first:
                setattr(self, name, model.get_submodule(name))
        setattr(self, pipeline.blocks, nn.ModuleDict({str(i): blocks[i] for r in stage_blocks.values() for i in r}))
        if num_stages - 1 in stage_blocks:
            for name in pipeline.last:
                setattr(self, name, model.get_submodule(name))

    def forward_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        if stage == 0:
            x = self.pipeline.embed(self, x)
        blocks = getattr(self, self.pipeline.blocks)
        for i in self.stage_blocks[stage]:
            x = blocks[str(i)](x)
        if stage == self.num_stages - 1:
            x = self.pipeline.head(self, x)
        return x

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The trainable parameters `forward_stage(stage, .)` uses."""
        blocks = getattr(self, self.pipeline.blocks)
        modules = [blocks[str(i)] for i in self.stage_blocks[stage]]
        if stage == 0:
            modules += [getattr(self, name) for name in self.pipeline.first]
        if stage == self.num_stages - 1:
            modules += [getattr(self, name) for name in self.pipeline.last]
        return [p for m in modules for p in m.parameters() if p.requires_grad]
