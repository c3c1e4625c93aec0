"""The pipeline stages one rank holds, for any model with a `PipelinePlan`.

A rank holds stages r, r + p, r + 2p, ... (virtual stages) of the model's blocks; the
first stage also holds the plan's `first` modules (the embedding), the last its `last`
ones (the final norm and output layer), every stage its `every_stage` ones (rotary
tables). The container keeps the model's parameter names - a dotted name such as
transformers' `model.layers` is held under the same path of plain containers - and a
tied copy answers to its holder's (`sharding.model_names`), so the full state gathers
back by name and checkpoints load into any layout.
"""

from __future__ import annotations

import torch
from torch import nn

from meshpar.mesh import ParallelMesh
from meshpar.parallel.plan import PipelinePlan, shared_weights
from meshpar.parallel.sharding import tie


class PipelineStages(nn.Module):
    """This rank's stages, with the interface the pipeline runtime drives:
    forward_stage(stage, x) and stage_parameters(stage)."""

    def __init__(self, model: nn.Module, pipeline: PipelinePlan, stage_blocks: dict[int, range], num_stages: int,
                 seq_shards: int = 1):
        super().__init__()
        self.pipeline, self.stage_blocks, self.num_stages = pipeline, stage_blocks, num_stages
        self.seq_shards = seq_shards  # tp under sequence parallelism: hidden states hold s / tp tokens
        self.positions: torch.Tensor | None = None  # this rank's tokens' global positions (context parallelism)
        blocks = model.get_submodule(pipeline.blocks)
        # In forward order: ZeRO's buckets and gathers follow it.
        self._hold(model, [*(pipeline.first if 0 in stage_blocks else []), *pipeline.every_stage])
        self._place(pipeline.blocks, nn.ModuleDict({str(i): blocks[i] for r in stage_blocks.values() for i in r}))
        self._hold(model, pipeline.last if num_stages - 1 in stage_blocks else [])

    def _hold(self, model: nn.Module, names: list[str]) -> None:
        for name in names:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            if leaf in owner._buffers:
                self._container(parent).register_buffer(leaf, owner._buffers[leaf], persistent=False)
            else:
                self._place(name, model.get_submodule(name))

    def _container(self, path: str) -> nn.Module:
        """The plain module at dotted `path` inside this one, made on first use."""
        node: nn.Module = self
        for part in filter(None, path.split(".")):
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        return node

    def _place(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        self._container(parent).add_module(leaf, module)

    def forward(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stage(stage, x)

    def forward_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens (first stage) or hidden states in; hidden states or logits (last) out."""
        seq = x.shape[1] * (1 if stage == 0 else self.seq_shards)
        if stage == 0:
            x = self.pipeline.embed(self, x)
        args, kwargs = (), {}
        if self.pipeline.block_args is not None:
            positions = self.positions if self.positions is not None else torch.arange(seq, device=x.device)
            args = self.pipeline.block_args(self, positions)
            if isinstance(args, dict):
                args, kwargs = (), args
        blocks = self.get_submodule(self.pipeline.blocks)
        for i in self.stage_blocks[stage]:
            x = blocks[str(i)](x, *args, **kwargs)
        if stage == self.num_stages - 1:
            x = self.pipeline.head(self, x)
        return x

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The trainable parameters `forward_stage(stage, .)` uses."""
        blocks = self.get_submodule(self.pipeline.blocks)
        modules = [blocks[str(i)] for i in self.stage_blocks[stage]]
        if stage == 0:
            modules += [self.get_submodule(name) for name in self.pipeline.first]
        if stage == self.num_stages - 1:
            modules += [self.get_submodule(name) for name in self.pipeline.last]
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def shared_by_the_ends(model: nn.Module, pipeline: PipelinePlan) -> list[list[str]]:
    """The places of each weight that a first-stage and a last-stage module share (a tied
    embedding and output layer): each end holds a copy, their gradients summed. A weight
    shared across other stages is refused (ValueError). Read before the model changes."""
    return [places for places in shared_weights(model) if _across_the_ends(places, pipeline)]


def tie_the_ends(model: nn.Module, shared: list[list[str]], mesh: ParallelMesh) -> None:
    """Mark the first stage's copy of each weight `shared_by_the_ends` found as its
    holder, the last stage's as a copy (`sharding.tie`), under its first place's name."""
    p, r = mesh.size("pp"), mesh.index("pp")
    if p > 1 and r in (0, p - 1):
        for places in shared:
            tie(model.get_parameter(places[0]), "holder" if r == 0 else "copy", places[0])


def _across_the_ends(places: list[str], pipeline: PipelinePlan) -> bool:
    """Whether a shared weight's places lie on the first and the last pipeline stage
    (True), on one stage (False); ValueError for any other spread."""
    def part(place: str) -> str:
        module = place.rpartition(".")[0]
        for kind, roots in (("first", pipeline.first), ("last", pipeline.last)):
            if any(module == root or module.startswith(root + ".") for root in roots):
                return kind
        if module.startswith(pipeline.blocks + "."):
            return "block " + module[len(pipeline.blocks) + 1:].split(".")[0]
        return "outside the pipeline plan"

    parts = {part(place) for place in places}
    if parts == {"first", "last"}:
        return True
    if len(parts) > 1 or "outside the pipeline plan" in parts:
        raise ValueError(f"{' and '.join(places)} share one weight across {', '.join(sorted(parts))}: with pp > 1 "
                         f"only a weight of the first and the last stage can be shared (an embedding and the "
                         f"output layer); untie them")
    return False
