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
    heads             column patterns whose outputs are this many heads: split by whole
                      heads; fewer heads than tp (grouped-query attention's KV heads, a
                      divisor of tp): each rank holds the head its query heads read,
                      replicated, and the copies' gradients are summed over tp
    divide_by_tp      attributes divided by tp (an attention's head count; a head count
                      below tp that divides it becomes 1: the one replicated head)
    partial_grads     modules in tp regions whose replicated parameters act on this
                      rank's heads only (Qwen3's per-head q and k norms): their
                      gradients are summed over tp
    pipeline          the model as first modules + embed(), a ModuleList of blocks,
                      last modules + head(): stages are runs of blocks
    blocks            the ModuleList of transformer blocks (or the pipeline's): where
                      sequence parallelism shards the sequence
    tp_regions        the modules that each hold a column-to-row pair (an attention,
                      an MLP): entered once for all their column layers and left once
                      (an all-reduce each way; sequence parallelism's all-gather and
                      reduce-scatter points)
    sequence_start, sequence_end, sequence_sharded
                      where sequence parallelism begins and ends, if not at the blocks'
                      input and output (below)

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
sequence and keeps its rows (meshpar/parallel/dropout.py). A plan may start the split
earlier and end it later: at `sequence_start`'s output (a vocab embedding then
reduce-scatters its partial lookups: half the bytes of an all-reduce and a scatter) and
at `sequence_end`'s input (a column layer then all-gathers as it enters, and its input
gradient is reduce-scattered); the modules outside the blocks in between
(`sequence_sharded`, a final norm) then also see 1/tp of the tokens.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from meshpar import comm
from meshpar.checkpoint.regions import box_of
from meshpar.mesh import ParallelMesh
from meshpar.model.loss import cross_entropy_sum
from meshpar.parallel.sharding import FUSED_ATTR, shard_spec
from meshpar.parallel.tensor import (ColumnLinear, RowLinear, VocabEmbedding, bracket, gather_to_replicated,
                                     on_first_input, on_output, scatter_to_sequence_parallel, sum_grads_over_tp,
                                     vocab_parallel_cross_entropy)


@dataclass
class PipelinePlan:
    """The model as a pipeline: `first` modules and `embed(model, tokens) -> hidden` on
    the first stage, the blocks of the ModuleList `blocks` (each `block(hidden) ->
    hidden`) spread over the stages, `last` modules and `head(model, hidden) -> logits`
    on the last stage. `hidden_size` is the width of what passes between stages.

    A block that takes more than the hidden states (rotary tables, say) gets them from
    `block_args(stages, positions)`, the tokens' global positions (s,) given: a tuple of
    positional arguments, or a dict of keyword arguments (transformers' decoder layers);
    what it reads - top-level modules or buffers of the model - is named in
    `every_stage`, and every stage holds it."""

    blocks: str
    first: list[str]
    last: list[str]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    hidden_size: int
    block_args: Callable[[nn.Module, torch.Tensor], tuple | dict] | None = None
    every_stage: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Module-name patterns (fnmatch over `named_modules()`) mapped to parallel styles:

    - column: nn.Linear split by output features; {pattern: k} for k fused outputs (q, k,
      v in one projection: each part is split, so a rank holds its heads of each);
    - row: nn.Linear split by input features, partial outputs summed, the bias added once;
    - vocab_embedding: nn.Embedding split by vocabulary rows;
    - vocab_output: the output nn.Linear split by vocabulary, with the vocab-parallel
      cross entropy (the full logits are never gathered);
    - heads: column patterns whose outputs are this many heads, split by whole heads
      (fewer heads than tp: one replicated head per rank);
    - divide_by_tp: attributes divided by tp (an attention's head count);
    - pipeline: a PipelinePlan, for pp > 1;
    - blocks: the ModuleList of transformer blocks, for sequence parallelism (without
      it, the pipeline's);
    - tp_regions: the modules holding a column-to-row pair, entered and left once;
    - sequence_start / sequence_end: the module whose output sequence parallelism
      splits / whose input it gathers (default: the blocks' input / output);
    - sequence_sharded: modules outside the blocks that run on the split sequence;
    - attention: the modules whose `attend(q, k, v)` method is the causal attention core
      (batch, heads, sequence, head_dim): context parallelism replaces it, selective
      recomputation recomputes it;
    - positions: the keyword under which the model's forward takes its tokens' global
      positions (sequence,), which context parallelism passes; `positions_batched`:
      as (1, sequence), transformers' `position_ids`;
    - partial_grads: modules inside tp regions whose replicated parameters act on this
      rank's heads only (Qwen3's per-head q and k norms): gradients summed over tp;
    - experts: a mixture of experts' experts modules (their weights stacked along dim 0,
      forward(x, experts, weights)): expert parallelism splits them over ep
      (meshpar/parallel/experts.py); tensor parallelism leaves them whole."""

    column: dict[str, int] | list[str] = field(default_factory=dict)
    row: list[str] = field(default_factory=list)
    vocab_embedding: list[str] = field(default_factory=list)
    vocab_output: str | None = None
    divide_by_tp: dict[str, list[str]] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    pipeline: PipelinePlan | None = None
    blocks: str | None = None
    tp_regions: list[str] = field(default_factory=list)
    sequence_start: str | None = None
    sequence_end: str | None = None
    sequence_sharded: list[str] = field(default_factory=list)
    attention: str | None = None
    positions: str | None = None
    positions_batched: bool = False
    partial_grads: list[str] = field(default_factory=list)
    experts: str | None = None

    def columns(self) -> dict[str, int]:
        """The column patterns with their fused-part counts."""
        return dict.fromkeys(self.column, 1) if isinstance(self.column, list) else dict(self.column)

    def block_list(self) -> str | None:
        """The name of the ModuleList of blocks: `blocks`, else the pipeline's."""
        return self.blocks or (self.pipeline.blocks if self.pipeline else None)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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


@dataclass
class TensorParallelism:
    """What a model split over tp needs besides its forward: the loss of its logits
    (vocab-parallel when the plan splits the output layer; the padded rows never count)
    and the sums over tp of the gradients that are partial there - replicated parameters
    that saw 1/tp of the tokens (sequence parallelism) or that one tp rank alone adds (a
    row layer's bias inside a tp region), and replicated heads (each holder saw only its
    own query heads' share)."""

    mesh: ParallelMesh
    vocab_start: int = 0
    vocab_valid: int | None = None  # this rank's real vocabulary rows; None: the output is not split
    partial: list[nn.Parameter] = field(default_factory=list)
    replicated_heads: list[nn.Parameter] = field(default_factory=list)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross entropy of a micro-batch."""
        if self.vocab_valid is None:
            return cross_entropy_sum(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.vocab_valid, self.mesh).sum()

    def sync_grads(self, params: list[nn.Parameter] | None = None) -> None:
        """After backward: sum over tp the partial gradients - of `params` only when given
        (one gradient bucket; the tp ranks of a slice call this for the same buckets in
        the same order). A parameter without a gradient (another pipeline stage's) is
        skipped, alike on the tp ranks of one stage."""
        wanted = None if params is None else {id(p) for p in params}

        def chosen(found: list[nn.Parameter]) -> list[nn.Parameter]:
            return [p for p in found if p.grad is not None and (wanted is None or id(p) in wanted)]
        sum_grads_over_tp(chosen(self.partial), self.mesh, "partial_grads")
        heads = chosen(self.replicated_heads)
        if not heads:
            return
        # Each holder writes its head's gradient at its box in a zeroed tensor of the full
        # size; one sum over tp then gives every head its total.
        slots = []
        for p in heads:
            box = box_of(p, self.mesh)
            head = box.offsets[0]
            slot = p.grad.new_zeros(box.full_shape)
            slot[head:head + p.shape[0]] = p.grad
            slots.append((p, head, slot))
        flat = torch.cat([slot.flatten() for _, _, slot in slots])
        comm.all_reduce(self.mesh, "tp", flat, tag="kv_grads")
        offset = 0
        for p, head, slot in slots:
            p.grad.copy_(flat[offset:offset + slot.numel()].view_as(slot)[head:head + p.shape[0]])
            offset += slot.numel()


def check_plan(model: nn.Module, plan: Plan, sequence_parallel: bool = False) -> None:
    """ValueError, before any change to the model, for a plan `apply_tensor_plan` could
    not apply: a shared weight its modules would cut differently, tp regions that hold
    no column-to-row pair, sequence parallelism without blocks and regions."""
    for places in shared_weights(model):
        splits = {_split_of(place.rpartition(".")[0], plan) for place in places}
        if len(splits) > 1:
            raise ValueError(f"{' and '.join(places)} share one weight, but the plan splits them differently; "
                             f"plan both alike (vocab_embedding with vocab_output) or untie them")
    if sequence_parallel and (plan.block_list() is None or not plan.tp_regions):
        raise ValueError("sequence_parallel needs the plan's blocks and tp regions: Plan(blocks='h', "
                         "tp_regions=['h.*.attn', 'h.*.mlp']) - the ModuleList of transformer blocks (or the "
                         "pipeline's) and the modules that each hold a column-to-row pair")
    if plan.tp_regions:
        _check_regions(model, plan)
    if sequence_parallel:
        names = dict(model.named_modules())
        for option in ("sequence_start", "sequence_end"):
            if getattr(plan, option) is not None and getattr(plan, option) not in names:
                raise ValueError(f"{option}={getattr(plan, option)!r} names no module of the model")
        if plan.sequence_sharded and not any(_matches(n, plan.sequence_sharded) for n in names):
            raise ValueError(f"sequence_sharded={plan.sequence_sharded} matches no module of the model")


def apply_tensor_plan(model: nn.Module, plan: Plan, mesh: ParallelMesh,
                      sequence_parallel: bool = False) -> TensorParallelism:
    """Replace the planned modules by their tp-parallel versions, in place, bracket the tp
    regions, and under `sequence_parallel` split the sequence (module docstring); after
    `check_plan`, which runs first. A weight shared by modules the plan cuts alike (a
    tied embedding and vocab-parallel output layer) stays one parameter."""
    tensor_parallel = TensorParallelism(mesh)
    columns = plan.columns()
    if mesh.size("tp") == 1:
        # Unsplit, a fused parameter is still marked: checkpoints save it as its parts in every layout.
        for name, module in model.named_modules():
            if name and _matches(name, columns) and columns[_which(name, columns)] > 1:
                for p in (module.weight, module.bias):
                    if p is not None:
                        setattr(p, FUSED_ATTR, columns[_which(name, columns)])
        return tensor_parallel
    check_plan(model, plan, sequence_parallel)
    shared = shared_weights(model)
    t = mesh.size("tp")

    def column(m: nn.Module, n: str) -> ColumnLinear:
        heads = plan.heads[_which(n, plan.heads)] if _matches(n, plan.heads) else None
        return ColumnLinear(m, mesh, columns[_which(n, columns)], heads)
    found = set()
    for name, module in list(model.named_modules()):
        for patterns, build in ((columns, column), (plan.row, lambda m, n: RowLinear(m, mesh)),
                                (plan.vocab_embedding, lambda m, n: VocabEmbedding(m, mesh))):
            if name and _matches(name, patterns):
                _set(model, name, build(module, name))
                found.add(name)
        if name and _matches(name, plan.divide_by_tp):
            for attr in plan.divide_by_tp[_which(name, plan.divide_by_tp)]:
                value = getattr(module, attr)
                if value % t and t % value:
                    raise ValueError(f"{name}.{attr}={value} and tp={t}: one must divide the other")
                setattr(module, attr, max(1, value // t))
    if plan.vocab_output:
        head = model.get_submodule(plan.vocab_output)
        _set(model, plan.vocab_output, ColumnLinear(head, mesh, pad=True))
        rows = -(-head.out_features // t)
        tensor_parallel.vocab_start = mesh.index("tp") * rows
        tensor_parallel.vocab_valid = max(0, min(rows, head.out_features - tensor_parallel.vocab_start))
        found.add(plan.vocab_output)
    if not found:
        raise ValueError("the plan matched no module of the model: check its names against named_modules()")
    for places in shared:  # each module got its own copy of its cut: one parameter again
        weight = model.get_parameter(places[0])
        for place in places[1:]:
            module_name, _, attr = place.rpartition(".")
            setattr(model.get_submodule(module_name), attr, weight)
    partial = [p for name, m in model.named_modules() if name and _matches(name, plan.partial_grads)
               for p in m.parameters()]
    for _, region in regions_of(model, plan):  # one entering and one leaving mapping per region
        for module in region.modules():
            if isinstance(module, ColumnLinear):
                module.enter = "none"
            elif isinstance(module, RowLinear):
                module.leave = False  # tp rank 0 adds the bias: its gradient is that rank's alone
                partial += [module.bias] if module.bias is not None else []
        bracket(region, mesh, sequence_parallel)
    tensor_parallel.replicated_heads = list({id(p): p for p in model.parameters()
                                             if shard_spec(p) is not None and shard_spec(p).replicas > 1}.values())
    if sequence_parallel:
        partial += _split_sequence(model, plan, mesh)
    tensor_parallel.partial = list({id(p): p for p in partial}.values())
    return tensor_parallel


def regions_of(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    """The tp regions inside the blocks, (name, module)."""
    name = plan.block_list()
    inside = "" if name is None else name + "."
    return [(n, m) for n, m in model.named_modules() if n.startswith(inside) and _matches(n, plan.tp_regions)]


def _check_regions(model: nn.Module, plan: Plan) -> None:
    """ValueError unless each tp region (inside the blocks) holds a column and a row
    layer of the plan, and no split layer of the blocks lies outside a region."""
    regions = regions_of(model, plan)
    if not regions:
        raise ValueError(f"tp_regions={plan.tp_regions} matches no module inside the blocks {plan.block_list()!r}")
    for region_name, region in regions:
        inside = [f"{region_name}.{n}" if n else region_name for n, _ in region.named_modules()]
        for patterns, label in ((plan.columns(), "column"), (plan.row, "row")):
            if not any(_matches(n, patterns) for n in inside):
                raise ValueError(f"tp region {region_name} holds no {label} layer of the plan")
    name = plan.block_list()
    if name is None:
        return
    # Under sequence parallelism a split layer between regions would see only this rank's
    # tokens, and a row layer there would add up partial sums of different tokens.
    for n, _ in model.named_modules():
        if (n.startswith(name + ".") and _matches(n, [*plan.columns(), *plan.row])
                and not any(n.startswith(r + ".") for r, _ in regions)):
            raise ValueError(f"{n} is split over tp but lies in no tp region; add the module holding it to tp_regions")


def _split_sequence(model: nn.Module, plan: Plan, mesh: ParallelMesh) -> list[nn.Parameter]:
    """Sequence parallelism over the plan's blocks, in place, once the tp regions are
    bracketed. Returns the replicated parameters that see 1/tp of the tokens, whose
    gradients must be summed over tp."""
    blocks = model.get_submodule(plan.block_list())
    start = model.get_submodule(plan.sequence_start) if plan.sequence_start else None
    if isinstance(start, VocabEmbedding):
        start.scatter = True  # its partial lookups reduce-scattered: the sum and the split in one
    elif start is not None:
        on_output(start, lambda y: scatter_to_sequence_parallel(y, mesh))
    else:
        on_first_input(blocks[0], lambda x: scatter_to_sequence_parallel(x, mesh))
    end = model.get_submodule(plan.sequence_end) if plan.sequence_end else None
    if isinstance(end, ColumnLinear):
        end.enter = "gather"  # all-gathered as it enters; its input gradient reduce-scattered
    elif end is not None:
        on_first_input(end, lambda x: gather_to_replicated(x, mesh))
    else:
        on_output(blocks[-1], lambda y: gather_to_replicated(y, mesh))
    sharded = [blocks] + [m for n, m in model.named_modules() if _matches(n, plan.sequence_sharded)]
    return list({id(p): p for m in sharded for p in m.parameters() if shard_spec(p) is None}.values())


def _which(name: str, patterns: dict[str, int]) -> str:
    return next(p for p in patterns if fnmatch.fnmatchcase(name, p))
