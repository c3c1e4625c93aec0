"""How a bucket's gradients cross the dp axis: in fp32, in 16 bits, in int8 with error
feedback, or hierarchically (inside each node, then across nodes).

Every scheme offers the two reductions ZeRO needs - an all-reduce (stage 0) and a
reduce-scatter into this rank's shard (stages 1-3) - and returns a `Pending` whose
`wait()` leaves fp32 sums where the caller asked for them.

    scheme        wire bytes per rank and element (ring)        state kept
    fp32          all-reduce 8(n-1)/n, reduce-scatter 4(n-1)/n   -
    bf16, fp16    half of fp32                                   -
    int8          a quarter of fp32, plus one fp32 scale per     the quantization error
                  `chunk` elements                               (error feedback)

int8: each rank quantizes its gradient per chunk (scale = max|x| / 127), sends block j to
rank j (all-to-all), and rank j dequantizes and sums in fp32: a reduce-scatter. The
all-reduce then quantizes the summed shard again and all-gathers it, so every replica
decodes the same bytes and the replicas stay identical. With error feedback each
quantization's error (gradient minus what was sent) is kept and added to the next
step's gradient, so nothing is lost over time, only delayed (Seide et al. 2014; Karimireddy
et al. 2019): after T steps the sum of what was sent equals the sum of the gradients less
the last error, which stays below half a quantization step per element.

Hierarchical all-reduce (ranks_per_node K, dp spanning M nodes with k ranks on each):
reduce-scatter inside the node, all-reduce of the 1/k shard across nodes, all-gather inside
the node. A rank then sends 2(M-1)/M * B/k bytes across nodes instead of the flat ring's
2(n-1)/n * B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

COMPRESSIONS = ("none", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INT8_CHUNK = 1024  # elements per quantization scale: 4 bytes of scale per 1024 of data


@dataclass
class ReduceOptions(Section):
    """The dp reduction of gradients: buckets, overlap with backward, the wire format."""

    bucket_mb: float = option(25.0, "gradient bucket size in MiB", positive=True)
    overlap: bool = option(True, "launch each bucket's dp reduction from backward as soon as it is complete "
                                 "(--no-overlap: after backward, for comparison)")
    grad_compression: str = option("none", "dp gradients on the wire: none (fp32), bf16, fp16, or int8 with a "
                                           "scale per 1024 elements and error feedback", choices=COMPRESSIONS)
    error_feedback: bool = option(True, "with --grad-compression int8: carry each step's quantization error "
                                        "into the next (--no-error-feedback drops it, for comparison)")
    hierarchical_allreduce: bool = option(False, "ZeRO-0 all-reduce in three steps: reduce-scatter inside each "
                                                 "node, all-reduce across nodes, all-gather inside the node")

    def problems(self, cfg: Config) -> list[str]:
        problems = []
        if self.grad_compression == "int8":
            if cfg.zero.stage == 3:
                problems.append("--grad-compression int8 works with --zero 0-2: its error feedback keeps a full "
                                "fp32 gradient per rank, which ZeRO-3 exists to avoid; use bf16 or fp16 with "
                                "ZeRO-3")
            if cfg.precision.precision == "fp16":
                problems.append("--grad-compression int8 with --precision fp16 is not supported: the error "
                                "carried between steps would be in units of a loss scale that may have changed; "
                                "use bf16")
            if self.hierarchical_allreduce:
                problems.append("--hierarchical-allreduce runs in fp32 or 16 bits; use --grad-compression none, "
                                "bf16 or fp16 with it")
        if self.hierarchical_allreduce:
            problems += self._hierarchy_problems(cfg)
        return problems

    def _hierarchy_problems(self, cfg) -> list[str]:
        mesh = cfg.mesh
        if cfg.zero.stage != 0:
            return [f"--hierarchical-allreduce replaces ZeRO-0's all-reduce; --zero {cfg.zero.stage} "
                    f"reduce-scatters gradients instead; use --zero 0"]
        k = mesh.node_size(cfg.environ())
        if not mesh.valid or k < 1 or mesh.world_size % k:
            return []  # the mesh's own problems
        try:
            per_node, nodes = mesh.shape.node_split("dp", k)
        except ValueError as err:
            return [f"--hierarchical-allreduce needs the same number of dp ranks on each node: {err}"]
        if per_node == 1 or nodes == 1:
            return [f"--hierarchical-allreduce needs dp to span nodes with several ranks on each; here "
                    f"dp={mesh.dp} has {per_node} rank(s) on each of {nodes} node(s) of {k} ranks "
                    f"(set --ranks-per-node)"]
        return []


class Pending:
    """An in-flight reduction: the work of its current collective, and the steps after
    it, each of which starts the next collective (returning its work) or finishes on this
    rank (returning None). `advance()` takes one step, `wait()` all of them. Callers
    advance in the same order on every rank, so the later collectives match."""

    def __init__(self, work=None, *steps):
        self.work, self.steps = work, list(steps)

    def is_completed(self) -> bool:
        """Whether the current collective is done (what is left runs on this rank alone
        for a reduce-scatter; an all-reduce's next steps may start collectives)."""
        return self.work is None or self.work.is_completed()

    @property
    def collectives_left(self) -> bool:
        """Whether a step still starts a collective (every chain's last step runs on this
        rank alone)."""
        return len(self.steps) > 1

    def advance(self):
        """Wait for the current collective and take the next step."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.steps:
            self.work = self.steps.pop(0)()

    def wait(self):
        while self.work is not None or self.steps:
            self.advance()


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    target.copy_(source)


def quantize(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one fp32 scale per `chunk` elements (len(x) a multiple of chunk)."""
    blocks = x.view(-1, chunk)
    scales = blocks.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, chunk: int) -> torch.Tensor:
    return (q.view(-1, chunk).to(torch.float32) * scales[:, None]).view(-1)


def _pack(q: torch.Tensor, scales: torch.Tensor, blocks: int) -> torch.Tensor:
    """Bytes of `blocks` equal blocks, each its int8 values followed by its scales."""
    return torch.cat([q.view(blocks, -1).view(torch.uint8),
                      scales.view(blocks, -1).view(torch.uint8)], dim=1).view(-1)


def _unpack(packed: torch.Tensor, blocks: int, block_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = packed.view(blocks, -1)
    return (rows[:, :block_numel].contiguous().view(torch.int8).view(-1),
            rows[:, block_numel:].contiguous().view(torch.float32).view(-1))


class GradReducer:
    """The dp reduction of flat fp32 gradient buffers under one scheme. Buffers passed
    for the same `key` (a bucket) must keep their size: error feedback remembers them."""

    def __init__(self, mesh: ParallelMesh, compression: str = "none", error_feedback: bool = True,
                 hierarchical: bool = False, chunk: int = INT8_CHUNK):
        if compression not in COMPRESSIONS:
            raise ValueError(f"gradient compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
        self.mesh, self.compression, self.chunk = mesh, compression, chunk
        self.error_feedback = error_feedback and compression == "int8"
        self.n = mesh.size("dp")
        self.hierarchical = hierarchical and "dp_intra" in mesh.sub_sizes
        if hierarchical and compression == "int8":
            raise ValueError("the hierarchical all-reduce runs in fp32 or 16 bits, not int8")
        self.errors: dict[object, torch.Tensor] = {}  # key -> error of this rank's quantization
        self.shard_errors: dict[object, torch.Tensor] = {}  # key -> error of the summed shard's

    def over(self, mesh: ParallelMesh) -> GradReducer:
        """The same scheme over `mesh`'s dp (a view: the experts' edp), flat."""
        return GradReducer(mesh, self.compression, self.error_feedback, False, self.chunk)

    def alignment(self, sharded: bool) -> int:
        """What a flat buffer's length must be a multiple of."""
        if self.n == 1:
            return 1
        if self.compression == "int8":
            return self.n * self.chunk
        if self.hierarchical:
            return self.n
        return self.n if sharded else 1

    def all_reduce(self, key, flat: torch.Tensor) -> Pending:
        """Sum `flat` over dp, in place."""
        if self.n == 1:
            return Pending()
        if self.compression == "int8":
            return self._int8(key, flat, None)
        low = self._cast(flat)
        if self.hierarchical:
            return self._hierarchical(low, flat)
        work = comm.all_reduce_async(self.mesh, "dp", low, tag="grads")
        return Pending(work) if low is flat else Pending(work, lambda: _copy(flat, low))

    def reduce_scatter(self, key, flat: torch.Tensor, out: torch.Tensor) -> Pending:
        """`out` receives this rank's 1/n of the sum of `flat` over dp."""
        if self.n == 1:
            out.copy_(flat)
            return Pending()
        if self.compression == "int8":
            return self._int8(key, flat, out)
        low = self._cast(flat)
        low_out = out if low is flat else torch.empty_like(out, dtype=low.dtype)
        work = comm.reduce_scatter_into(self.mesh, "dp", low_out, low, tag="grads", async_op=True)
        return Pending(work) if low_out is out else Pending(work, lambda: _copy(out, low_out))

    def _cast(self, flat: torch.Tensor) -> torch.Tensor:
        dtype = _DTYPES.get(self.compression)
        return flat if dtype is None else flat.to(dtype)

    def _hierarchical(self, buffer: torch.Tensor, flat: torch.Tensor) -> Pending:
        k = self.mesh.size("dp_intra")
        shard = buffer.new_empty(buffer.numel() // k)
        work = comm.reduce_scatter_into(self.mesh, "dp_intra", shard, buffer, tag="grads", async_op=True)

        def across():
            return comm.all_reduce_async(self.mesh, "dp_inter", shard, tag="grads")

        def inside():
            return comm.all_gather_into(self.mesh, "dp_intra", buffer, shard, tag="grads", async_op=True)

        def back():
            if buffer is not flat:
                flat.copy_(buffer)
        return Pending(work, across, inside, back)

    def _quantize_with_feedback(self, errors: dict, key, x: torch.Tensor):
        """Quantize x plus the error carried from the last step; keep the new error."""
        if self.error_feedback:
            if key in errors:
                x = x + errors[key]
            q, scales = quantize(x, self.chunk)
            errors[key] = x - dequantize(q, scales, self.chunk)
        else:
            q, scales = quantize(x, self.chunk)
        return q, scales

    def _int8(self, key, flat: torch.Tensor, out: torch.Tensor | None) -> Pending:
        n, chunk = self.n, self.chunk
        block = flat.numel() // n
        q, scales = self._quantize_with_feedback(self.errors, key, flat)
        packed = _pack(q, scales, n)
        received = torch.empty_like(packed)
        work = comm.all_to_all_into(self.mesh, "dp", received, packed, tag="grads", async_op=True)
        everyone = None

        def summed():
            nonlocal everyone
            qs, ss = _unpack(received, n, block)
            shard = dequantize(qs, ss, chunk).view(n, block).sum(dim=0)
            if out is not None:
                out.copy_(shard)
                return None
            q2, s2 = self._quantize_with_feedback(self.shard_errors, key, shard)  # every replica decodes these
            mine = _pack(q2, s2, 1)
            everyone = mine.new_empty(n * mine.numel())
            return comm.all_gather_into(self.mesh, "dp", everyone, mine, tag="grads", async_op=True)

        def decoded():
            qa, sa = _unpack(everyone, n, block)
            flat.copy_(dequantize(qa, sa, chunk))
        return Pending(work, summed) if out is not None else Pending(work, summed, decoded)

    def state_bytes(self) -> int:
        """Bytes of the error-feedback buffers."""
        return sum(t.numel() * t.element_size() for d in (self.errors, self.shard_errors) for t in d.values())
