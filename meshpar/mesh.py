"""ParallelMesh: the one object that knows the layout of ranks.

Axes, slowest to fastest: pp, dp, cp, tp. Nodes hold consecutive ranks (`ranks_per_node`
of them), so this order is the topology-aware placement: tensor parallelism, which
exchanges activations twice per layer, varies fastest and stays inside a node; then
context parallelism, then data parallelism; pipeline stages, which pass one activation
per micro-batch, vary slowest and span nodes. The mesh is passed explicitly to whatever
needs it; there are no globals.

Besides the four axes, derived groups: dp's halves inside and across nodes (`dp_intra`,
`dp_inter`, for the hierarchical all-reduce); `pp_ends`, the first and the last pipeline
stage of each slice, which both hold a tied embedding's weight; and expert parallelism's
`ep` - consecutive dp ranks, each holding its share of every layer's experts, exchanging
tokens - and `edp`, the dp ranks holding the same experts (one of each ep group), over
which the experts' gradients are reduced.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from meshpar.comm import Ledger
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

AXES = ("pp", "dp", "cp", "tp")  # slowest to fastest in the rank order
DERIVED = ("dp_intra", "dp_inter", "pp_ends", "ep", "edp")  # groups made from the axes' slices


def divisors(n: int) -> list[int]:
    """The degrees that split `n` evenly, ascending: what a message offers when one does not."""
    return [d for d in range(1, n + 1) if n % d == 0]


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

    def node_split(self, axis: str, ranks_per_node: int) -> tuple[int, int]:
        """(ranks per node, nodes) of every `axis` slice, when each slice has the same
        number of ranks on each node it touches; ValueError otherwise."""
        splits = set()
        for ranks in self.axis_groups(axis):
            per_node: dict[int, int] = {}
            for r in ranks:
                per_node[r // ranks_per_node] = per_node.get(r // ranks_per_node, 0) + 1
            if len(set(per_node.values())) != 1:
                raise ValueError(f"{axis} ranks {ranks} are spread unevenly over nodes of {ranks_per_node}")
            splits.add((next(iter(per_node.values())), len(per_node)))
        if len(splits) != 1:
            raise ValueError(f"{axis} slices are split differently over nodes of {ranks_per_node}")
        return splits.pop()

    def placement(self, ranks_per_node: int) -> dict[str, str]:
        """Where each axis of size above 1 lies: inside a node or across how many nodes."""
        out = {}
        for axis in AXES:
            if self.size(axis) == 1:
                continue
            spans = {tuple(sorted({r // ranks_per_node for r in ranks})) for ranks in self.axis_groups(axis)}
            nodes = max(len(s) for s in spans)
            out[axis] = "inside a node" if nodes == 1 else f"across {nodes} nodes"
        return out

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every slice along `axis`: the ranks that differ only in their `axis` index."""
        others = [a for a in AXES if a != axis]
        groups = []
        for fixed in itertools.product(*(range(self.size(a)) for a in others)):
            coords = dict(zip(others, fixed))
            groups.append([self.rank(**coords, **{axis: i}) for i in range(self.size(axis))])
        return groups


@dataclass
class MeshOptions(Section):
    """The mesh: each axis's degree, and how many ranks share a node."""

    dp: int = option(1, "data-parallel degree", at_least=1)
    tp: int = option(1, "tensor-parallel degree", at_least=1)
    pp: int = option(1, "pipeline-parallel degree", at_least=1)
    cp: int = option(1, "context-parallel degree", at_least=1)
    ep: int = option(1, "expert-parallel degree, within dp: groups of ep dp ranks, each rank holding "
                        "num_experts / ep of every layer's experts", at_least=1)
    ranks_per_node: int | None = option(None, "ranks per node, for placement and the hierarchical all-reduce "
                                              "(default: torchrun's LOCAL_WORLD_SIZE, else every rank)",
                                        at_least=1)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def valid(self) -> bool:
        return min(self.dp, self.tp, self.pp, self.cp) >= 1

    @property
    def shape(self) -> MeshShape:
        return MeshShape(pp=self.pp, dp=self.dp, cp=self.cp, tp=self.tp)

    def node_size(self, env=None) -> int:
        """As configured, else torchrun's LOCAL_WORLD_SIZE, else the world."""
        env = os.environ if env is None else env
        if self.ranks_per_node is not None:
            return self.ranks_per_node
        if "LOCAL_WORLD_SIZE" in env and "RANK" in env:
            return int(env["LOCAL_WORLD_SIZE"])
        return self.world_size

    def problems(self, cfg: Config) -> list[str]:
        if not self.valid:
            return []
        env = cfg.environ()
        problems = []
        if "WORLD_SIZE" in env and "RANK" in env and int(env["WORLD_SIZE"]) != self.world_size:
            problems.append(f"torchrun started {env['WORLD_SIZE']} ranks but dp*tp*pp*cp = "
                            f"{self.world_size}; make the degrees multiply to the world size")
        k = self.node_size(env)
        if k < 1:  # said by the option's own check
            return problems
        if self.world_size % k:
            return problems + [f"--ranks-per-node {k} must divide the world size {self.world_size}; "
                               f"use one of {', '.join(map(str, divisors(self.world_size)))}"]
        if k % self.tp:
            problems.append(f"--tp {self.tp} does not fit in a node of {k} ranks: tensor parallelism exchanges "
                            f"activations twice per layer and stays inside a node; use a tp dividing {k}")
        from meshpar.parallel.experts import expert_parallel_problems
        return problems + expert_parallel_problems(cfg)


@dataclass
class ParallelMesh:
    """This rank's place in the mesh, its process group per axis, and its ledger."""

    shape: MeshShape
    rank: int
    groups: dict[str, object] = field(default_factory=dict)  # axis -> ProcessGroup
    ledger: Ledger = field(default_factory=Ledger)
    ranks_per_node: int | None = None  # None: every rank on one node
    # Derived groups (see the module docstring): "dp_intra" and "dp_inter" when dp spans
    # nodes, "pp_ends" when pp > 1 (its group exists on the two end ranks only).
    sub_sizes: dict[str, int] = field(default_factory=dict)
    # Gloo with device tensors: run every collective on host copies (see comm.HostStaged).
    host_staging: bool = False
    aliases: dict[str, str] = field(default_factory=dict)  # a view's: {"dp": "edp"} (`data_parallel_over`)
    _spans: dict[str, bool] = field(default_factory=dict, init=False, repr=False)  # spans_nodes, per axis

    @classmethod
    def single(cls) -> ParallelMesh:
        """A world of one rank: every axis has size 1 and no process group exists."""
        return cls(MeshShape(), 0)

    @classmethod
    def build(cls, shape: MeshShape, ranks_per_node: int | None = None, ep: int = 1) -> ParallelMesh:
        """Create one process group per axis slice (and dp's intra- and inter-node halves
        when dp spans nodes with several ranks on each; ep and edp when `ep` is above 1).
        Collective: every rank calls this with the same arguments, after
        `torch.distributed.init_process_group`."""
        if shape.dp % ep:
            raise ValueError(f"ep={ep} must divide dp={shape.dp}: expert parallelism splits the dp ranks")
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
        sub_sizes = {}
        if ranks_per_node is not None and shape.dp > 1:
            per_node, nodes = shape.node_split("dp", ranks_per_node)
            if per_node > 1 and nodes > 1:
                sub_sizes = {"dp_intra": per_node, "dp_inter": nodes}
                for ranks in shape.axis_groups("dp"):
                    halves = [ranks[i:i + per_node] for i in range(0, len(ranks), per_node)]
                    for group_ranks, name in [(h, "dp_intra") for h in halves] + \
                                              [(list(g), "dp_inter") for g in zip(*halves)]:
                        group = dist.new_group(group_ranks)
                        if rank in group_ranks:
                            groups[name] = group
        if ep > 1:
            sub_sizes.update(ep=ep, edp=shape.dp // ep)
            for ranks in shape.axis_groups("dp"):
                for group_ranks, name in [(ranks[i:i + ep], "ep") for i in range(0, len(ranks), ep)] + \
                                         [(ranks[j::ep], "edp") for j in range(ep)]:
                    group = dist.new_group(group_ranks) if len(group_ranks) > 1 else None
                    if rank in group_ranks and group is not None:
                        groups[name] = group
        if shape.pp > 1:
            sub_sizes["pp_ends"] = 2
            for ranks in shape.axis_groups("pp"):
                if shape.pp == 2:  # the ends are the whole slice: its group serves
                    if rank in ranks:
                        groups["pp_ends"] = groups["pp"]
                    continue
                group = dist.new_group([ranks[0], ranks[-1]])
                if rank in (ranks[0], ranks[-1]):
                    groups["pp_ends"] = group
        return cls(shape, rank, groups, ranks_per_node=ranks_per_node, sub_sizes=sub_sizes)

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    def size(self, axis: str) -> int:
        """Ranks along `axis` (or a derived group: dp_intra, dp_inter, pp_ends)."""
        axis = self.aliases.get(axis, axis)
        if axis in self.sub_sizes:
            return self.sub_sizes[axis]
        if axis in DERIVED:  # not made for this mesh: nothing to reduce over
            return 1
        return self.shape.size(axis)

    def node_of(self, rank: int) -> int:
        """The node holding global rank `rank` (0 when nodes are not configured)."""
        return 0 if self.ranks_per_node is None else rank // self.ranks_per_node

    def spans_nodes(self, axis: str) -> bool:
        """Whether this rank's `axis` slice ('world' for all ranks) reaches other nodes:
        its collectives then run at inter-node bandwidth."""
        if self.ranks_per_node is None or self.ranks_per_node >= self.world_size or axis == "dp_intra":
            return False
        if axis == "dp_inter":
            return True
        if axis not in self._spans:  # asked on every collective: work it out once
            ranks = range(self.world_size) if axis == "world" else self.ranks(axis.removesuffix("_p2p"))
            self._spans[axis] = len({r // self.ranks_per_node for r in ranks}) > 1
        return self._spans[axis]

    def index(self, axis: str) -> int:
        """This rank's index along `axis` (ep and edp too)."""
        axis = self.aliases.get(axis, axis)
        if axis in ("ep", "edp"):
            dp, ep = self.shape.coords(self.rank)["dp"], self.size("ep")
            return dp % ep if axis == "ep" else dp // ep
        return self.shape.coords(self.rank)[axis]

    def coords(self) -> dict[str, int]:
        """This rank's index along every axis."""
        return self.shape.coords(self.rank)

    def group(self, axis: str) -> object:
        """The process group of this rank's slice along `axis` ('world' for all ranks)."""
        axis = self.aliases.get(axis, axis)
        if axis == "world":
            return dist.group.WORLD
        return self.groups[axis]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's slice along `axis`, in axis order."""
        axis = self.aliases.get(axis, axis)
        coords = self.coords()
        if axis == "pp_ends":
            return [self.peer("pp", 0), self.peer("pp", self.size("pp") - 1)]
        if axis in ("ep", "edp"):
            dp = [self.shape.rank(**{**coords, "dp": i}) for i in range(self.shape.dp)]
            ep, mine = self.size("ep"), self.index("ep")
            start = coords["dp"] - mine
            return dp[start:start + ep] if axis == "ep" else dp[mine::ep]
        return [self.shape.rank(**{**coords, axis: i}) for i in range(self.size(axis))]

    def destroy(self) -> None:
        """Release this mesh's process groups (their connections and threads); for a
        process that builds many meshes, as the test worlds do. Collective."""
        for group in set(self.groups.values()):
            dist.destroy_process_group(group)
        self.groups.clear()

    def data_parallel_over(self, axis: str) -> ParallelMesh:
        """This mesh seen with `axis` (edp) as its dp: what reduces, shards and gathers over
        dp for the parameters replicated only there (the experts) uses it. It shares the
        ledger; dp's node halves do not exist in it (no hierarchical reduction)."""
        if axis == "dp":
            return self
        sub_sizes = {k: v for k, v in self.sub_sizes.items() if k not in ("dp_intra", "dp_inter")}
        groups = {k: v for k, v in self.groups.items() if k not in ("dp_intra", "dp_inter")}
        return ParallelMesh(self.shape, self.rank, groups, self.ledger, self.ranks_per_node, sub_sizes,
                            self.host_staging, {"dp": axis})

    def peer(self, axis: str, index: int) -> int:
        """The global rank at `index` along `axis`, other coordinates as this rank's."""
        return self.shape.rank(**{**self.coords(), axis: index})

    def describe(self) -> str:
        """'pp=2 x dp=2 x cp=1 x tp=2'."""
        return " x ".join(f"{axis}={self.size(axis)}" for axis in AXES)
