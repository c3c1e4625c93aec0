"""ParallelMesh: the one object that knows the layout of ranks.

Axes, slowest to fastest: pp, dp, cp, tp. Tensor parallelism varies fastest so that a tp
group sits on consecutive ranks, inside one node; pipeline stages vary slowest, across
nodes. The mesh is passed explicitly to whatever needs it; there are no globals.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch.distributed as dist

from meshpar.comm import Ledger

AXES = ("pp", "dp", "cp", "tp")  # slowest to fastest in the rank order


@dataclass(frozen=True)
class MeshShape:
    """Degrees of each axis; pure arithmetic on ranks, no process groups."""

    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return math.prod(self.size(axis) for axis in AXES)

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> {axis: index}, with tp varying fastest."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        coords = {}
        for axis in reversed(AXES):
            rank, coords[axis] = divmod(rank, self.size(axis))
        return {axis: coords[axis] for axis in AXES}

    def rank(self, **coords: int) -> int:
        """{axis: index} -> rank; axes not given are at index 0."""
        rank = 0
        for axis in AXES:
            rank = rank * self.size(axis) + coords.get(axis, 0)
        return rank

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every slice along `axis`: the ranks that differ only in their `axis` index."""
        others = [a for a in AXES if a != axis]
        groups = []
        for fixed in itertools.product(*(range(self.size(a)) for a in others)):
            coords = dict(zip(others, fixed))
            groups.append([self.rank(**coords, **{axis: i}) for i in range(self.size(axis))])
        return groups


@dataclass
class ParallelMesh:
    """This rank's place in the mesh, its process group per axis, and its ledger."""

    shape: MeshShape
    rank: int
    groups: dict[str, object] = field(default_factory=dict)  # axis -> ProcessGroup
    ledger: Ledger = field(default_factory=Ledger)

    @classmethod
    def single(cls) -> ParallelMesh:
        """A world of one rank: every axis has size 1 and no process group exists."""
        return cls(MeshShape(), 0)

    @classmethod
    def build(cls, shape: MeshShape) -> ParallelMesh:
        """Create one process group per axis slice. Collective: every rank calls this
        with the same shape, after `torch.distributed.init_process_group`."""
        if shape.world_size == 1:
            return cls.single()
        if not dist.is_initialized():
            raise RuntimeError("ParallelMesh.build needs an initialised process group")
        if dist.get_world_size() != shape.world_size:
            raise ValueError(f"mesh {shape} needs {shape.world_size} ranks, "
                             f"the process group has {dist.get_world_size()}")
        rank = dist.get_rank()
        groups = {}
        for axis in AXES:
            if shape.size(axis) == 1:
                continue
            # Every rank must create every group, in the same order.
            for ranks in shape.axis_groups(axis):
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[axis] = group
                if axis in ("pp", "cp"):
                    # Point-to-point gets a group of its own: sends and receives advance a
                    # group's sequence number on some ranks only, which would make the
                    # collectives' consistency check (TORCH_DISTRIBUTED_DEBUG=DETAIL) fail.
                    p2p = dist.new_group(ranks)
                    if rank in ranks:
                        groups[f"{axis}_p2p"] = p2p
        return cls(shape, rank, groups)

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    def size(self, axis: str) -> int:
        return self.shape.size(axis)

    def index(self, axis: str) -> int:
        """This rank's index along `axis`."""
        return self.shape.coords(self.rank)[axis]

    def coords(self) -> dict[str, int]:
        return self.shape.coords(self.rank)

    def group(self, axis: str):
        """The process group of this rank's slice along `axis` ('world' for all ranks)."""
        if axis == "world":
            return dist.group.WORLD
        return self.groups[axis]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's slice along `axis`, in axis order."""
        coords = self.coords()
        return [self.shape.rank(**{**coords, axis: i}) for i in range(self.size(axis))]

    def destroy(self):
        """Release this mesh's process groups (their connections and threads); for a
        process that builds many meshes, as the test worlds do. Collective."""
        for group in set(self.groups.values()):
            dist.destroy_process_group(group)
        self.groups.clear()

    def peer(self, axis: str, index: int) -> int:
        """The global rank at `index` along `axis`, other coordinates as this rank's."""
        return self.shape.rank(**{**self.coords(), axis: index})

    def describe(self) -> str:
        return " x ".join(f"{axis}={self.size(axis)}" for axis in AXES)
