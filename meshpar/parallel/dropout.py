"""Dropout on a rank that holds only some of the sequence's tokens, with the mask one
device would draw.

The model's dropout draws its mask as `rand(shape) >= p` (meshpar/model/llama.py). A
rank holding part of the sequence - context parallelism's two load-balanced chunks,
sequence parallelism's 1/tp of them, or both - draws the mask of the whole sequence
and keeps the rows of its own tokens. The ranks sharing a sequence share the generator
state (`dropout_seed`: one stream per dp rank and pipeline stage), so together they
apply the mask of one device, in the same generator calls on CPU and CUDA alike.

The price: each rank generates the random numbers of the whole sequence, cp x tp times
its own, and holds them for a moment: 5 bytes per element of the whole tensor under the
model's rule (the uniform draws and the comparison's booleans), one element of the
tensor's dtype under torch's. A counter-based generator, hashing each element's global
position, would generate only the rank's own; it would also change the masks of one
device.
"""

from __future__ import annotations

import torch
from torch import nn

from meshpar.mesh import ParallelMesh
from meshpar.model.llama import Dropout
from meshpar.parallel.context import local_positions
from meshpar.parallel.tensor import SEQ_DIM


class ShardedDropout(nn.Module):
    """Dropout on this rank's tokens of a (batch, sequence, hidden) tensor: its cp chunks
    and, under `sequence_parallel`, its tp block of those. `like_torch`: the mask and
    scaling of `nn.Dropout` on CPU (bernoulli(1 - p) divided by 1 - p, then a product)
    instead of the model's `rand >= p` - for a plan's model (on CUDA torch's dropout is a
    fused kernel with its own draws, so there the masks are alike in distribution only)."""

    def __init__(self, p: float, mesh: ParallelMesh, sequence_parallel: bool, like_torch: bool = False):
        super().__init__()
        self.p, self.like_torch = p, like_torch
        self.cp, self.cp_rank = mesh.size("cp"), mesh.index("cp")
        self.tp, self.tp_rank = (mesh.size("tp"), mesh.index("tp")) if sequence_parallel else (1, 0)
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Positions in the whole sequence of this rank's `local_len` tokens, in its order."""
        key = (local_len, device)
        if key not in self._rows:
            full_len = local_len * self.tp * self.cp
            mine = local_positions(full_len, self.cp, self.cp_rank, device) if self.cp > 1 else torch.arange(
                full_len, device=device)
            self._rows[key] = mine.chunk(self.tp)[self.tp_rank]
        return self._rows[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = self.rows(x.shape[SEQ_DIM], x.device)
        full_shape = list(x.shape)
        full_shape[SEQ_DIM] *= self.tp * self.cp
        if self.like_torch:
            scale = torch.empty(full_shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
            return x * scale.index_select(SEQ_DIM, rows)
        keep = (torch.rand(full_shape, device=x.device) >= self.p).index_select(SEQ_DIM, rows)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, cp={self.cp}, tp_blocks={self.tp}"


def dropout_seed(seed: int, mesh: ParallelMesh, step: int = 0) -> int:
    """The seed of this rank's dropout stream, from `step` on (a fresh stream after a
    load into another layout). The tp and cp ranks of a replica's stage share one: they
    draw one mask together. dp ranks draw their own, and so do pipeline ranks - sharing a
    stream, stage 1 would apply in its layers the very masks stage 0 applies in its."""
    return seed + 1 + mesh.index("dp") + mesh.size("dp") * mesh.index("pp") + 1_000_003 * step


def shard_dropouts(model: nn.Module, blocks: str, regions: list[str], mesh: ParallelMesh,
                   sequence_parallel: bool) -> None:
    """Where the tokens are split (cp above 1, or tp above 1 under sequence parallelism),
    give the dropouts inside the ModuleList `blocks` but outside the tp `regions` (which
    see whole sequences, or hold tensors split by heads) a sharded copy: meshpar's own
    `Dropout` keeps its rule, torch's `nn.Dropout` its own."""
    if mesh.size("cp") == 1 and not (sequence_parallel and mesh.size("tp") > 1):
        return
    for name, module in list(model.named_modules()):
        if (not name.startswith(blocks + ".") or any(name == r or name.startswith(r + ".") for r in regions)
                or type(module) not in (Dropout, nn.Dropout) or module.p == 0):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                ShardedDropout(module.p, mesh, sequence_parallel, like_torch=type(module) is nn.Dropout))
