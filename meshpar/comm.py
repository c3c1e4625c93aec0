"""Every collective meshpar issues, with a ledger of calls and bytes per mesh axis. Each
is a graph break under torch.compile, run as written (`graph_breaks`).

`bytes` is the payload: the size of the tensor handed to the collective (the full
tensor for all-reduce, the gathered output for all-gather, the unreduced input for
reduce-scatter). `wire_bytes` is what one rank sends under a ring algorithm
(2(n-1)/n of the payload for all-reduce, (n-1)/n for all-gather and reduce-scatter).
`inter_node_bytes` is the part of it that runs at inter-node bandwidth: all of a
collective's wire bytes when its group spans nodes (every step of a ring waits for its
slowest link), a send's bytes when its peer is on another node. An axis of size 1 moves
nothing and records nothing.
"""

from __future__ import annotations

import math
import pickle
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from meshpar.graph_breaks import graph_break

if TYPE_CHECKING:
    from meshpar.mesh import ParallelMesh

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass
class Entry:
    calls: int = 0
    bytes: int = 0
    wire_bytes: float = 0.0
    inter_node_bytes: float = 0.0


class Ledger:
    """Calls and bytes, keyed by (axis, op, tag). `tag` says what the bytes were for
    ("grads", "loss", ...) so a test can check one purpose against its formula.

    It also keeps the last 20 operations issued and the one this rank is blocked in, if
    any, for the hang watchdog (watchdog.py)."""

    def __init__(self):
        self.entries: dict[tuple[str, str, str], Entry] = defaultdict(Entry)
        self.history: deque[tuple[float, str, str, str, int]] = deque(maxlen=20)  # (time, axis, op, tag, bytes)
        self.pending: tuple[float, str, str, str] | None = None  # (since, axis, op, tag)
        self.wait_s: dict[str, float] = defaultdict(float)  # axis -> seconds blocked in its operations

    @contextmanager
    def waiting(self, axis: str, op: str, tag: str):
        """Marks the block as this rank waiting on `op` over `axis`: for the watchdog, the
        time split (wait_s) and a trace (a profiler range named after it)."""
        start = time.monotonic()
        self.pending = (start, axis, op, tag)
        try:
            with torch.profiler.record_function(f"{op} {axis} {tag}"):
                yield
        finally:
            self.pending = None
            self.wait_s[axis] += time.monotonic() - start

    def record(self, axis: str, op: str, tag: str, payload_bytes: int, wire_bytes: float,
               inter_node: bool = False):
        self.history.append((time.time(), axis, op, tag, payload_bytes))
        entry = self.entries[(axis, op, tag)]
        entry.calls += 1
        entry.bytes += payload_bytes
        entry.wire_bytes += wire_bytes
        if inter_node:
            entry.inter_node_bytes += wire_bytes

    def total(self, field: str = "bytes", axis: str | None = None, op: str | None = None,
              tag: str | None = None) -> float:
        """Sum of `field` ('calls', 'bytes', 'wire_bytes' or 'inter_node_bytes') over
        matching entries."""
        return sum(getattr(entry, field) for (a, o, t), entry in self.entries.items()
                   if axis in (None, a) and op in (None, o) and tag in (None, t))

    def reset(self):
        self.entries.clear()

    def summary(self) -> dict[str, dict]:
        """{axis: {op: {calls, bytes, wire_bytes, inter_node_bytes}}}, summed over tags;
        JSON-ready."""
        out: dict[str, dict] = {}
        for (axis, op, _tag), entry in sorted(self.entries.items()):
            slot = out.setdefault(axis, {}).setdefault(
                op, {"calls": 0, "bytes": 0, "wire_bytes": 0, "inter_node_bytes": 0})
            slot["calls"] += entry.calls
            slot["bytes"] += entry.bytes
            slot["wire_bytes"] += round(entry.wire_bytes)
            slot["inter_node_bytes"] += round(entry.inter_node_bytes)
        return out


class HostStaged:
    """A collective gloo ran on host copies of device tensors (gloo has no CUDA path for
    most collectives; meshpar stages every one through host memory when the mesh says
    so, for tests with several ranks on one GPU). Waiting on it waits for gloo, then
    copies the results back into the device tensors."""

    def __init__(self, work, copy_back: list[tuple[torch.Tensor, torch.Tensor]]):
        self.work, self.copy_back = work, copy_back

    def is_completed(self) -> bool:
        return self.work is None or self.work.is_completed()

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
        for device_tensor, host_tensor in self.copy_back:
            device_tensor.copy_(host_tensor)
        self.copy_back = []
        return True


def _on_host(mesh: ParallelMesh, tensor: torch.Tensor) -> torch.Tensor:
    """What the backend is handed: the tensor itself, or with host staging a host copy."""
    return tensor.to("cpu", copy=True) if mesh.host_staging else tensor


def _finish(mesh: ParallelMesh, work, pairs: list[tuple[torch.Tensor, torch.Tensor]], async_op: bool):
    """The work to hand back (async) or the copies back done now (blocking)."""
    if not mesh.host_staging:
        return work
    staged = HostStaged(work, [(t, h) for t, h in pairs if t is not h])
    if async_op:
        return staged
    staged.wait()
    return None


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _record(mesh: ParallelMesh, axis: str, op: str, tag: str, payload: int, wire_fraction: float):
    mesh.ledger.record(axis, op, tag, payload, wire_fraction * payload, mesh.spans_nodes(axis))


@graph_break
def all_reduce(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str,
               op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over this rank's `axis` slice."""
    n = mesh.world_size if axis == "world" else mesh.size(axis)
    if n == 1:
        return tensor
    _record(mesh, axis, "all_reduce", tag, _nbytes(tensor), 2 * (n - 1) / n)
    with mesh.ledger.waiting(axis, "all_reduce", tag):
        host = _on_host(mesh, tensor)
        dist.all_reduce(host, op=_REDUCE_OPS[op], group=mesh.group(axis))
        _finish(mesh, None, [(tensor, host)], async_op=False)
    return tensor


@graph_break
def broadcast(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str, source: int = 0) -> torch.Tensor:
    """In place: the `axis` slice's rank at index `source` sends `tensor`, the others
    receive it."""
    n = mesh.size(axis)
    if n == 1:
        return tensor
    _record(mesh, axis, "broadcast", tag, _nbytes(tensor), (n - 1) / n)
    with mesh.ledger.waiting(axis, "broadcast", tag):
        host = _on_host(mesh, tensor)
        dist.broadcast(host, src=mesh.peer(axis, source), group=mesh.group(axis))
        _finish(mesh, None, [(tensor, host)], async_op=False)
    return tensor


@graph_break
def all_gather_object(mesh: ParallelMesh, obj, *, tag: str, axis: str = "world") -> list:
    """Every rank's `obj` along `axis`, on every rank of it (pickled; for small metadata
    and test-sized state only)."""
    n = mesh.world_size if axis == "world" else mesh.size(axis)
    if n == 1:
        return [obj]
    payload = len(pickle.dumps(obj))
    _record(mesh, axis, "all_gather_object", tag, n * payload, (n - 1) / n)
    out = [None] * n
    with mesh.ledger.waiting(axis, "all_gather_object", tag):
        dist.all_gather_object(out, obj, group=mesh.group(axis))
    return out


# torch 2.13 renamed the tensor collectives; 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's `tensor` on this rank's `axis` slice."""
    n = mesh.size(axis)
    if n == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((n * tensor.shape[0], *tensor.shape[1:]))
    all_gather_into(mesh, axis, out, tensor, tag=tag)
    return out


def reduce_scatter(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str) -> torch.Tensor:
    """Sum over the `axis` slice, this rank keeping its 1/n of dim 0."""
    n = mesh.size(axis)
    if n == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((tensor.shape[0] // n, *tensor.shape[1:]))
    reduce_scatter_into(mesh, axis, out, tensor, tag=tag)
    return out


def _into(mesh: ParallelMesh, axis: str, op: str, tag: str, out: torch.Tensor, tensor: torch.Tensor,
          payload: torch.Tensor, collective, async_op: bool):
    """The shape shared by the collectives that write into `out`: nothing to move on one
    rank, else record the payload ((n-1)/n of it on the wire) and run `collective`."""
    n = mesh.size(axis)
    if n == 1:
        out.copy_(tensor)
        return None
    _record(mesh, axis, op, tag, _nbytes(payload), (n - 1) / n)
    with mesh.ledger.waiting(axis, op, tag):
        host_out, host_in = _on_host(mesh, out), _on_host(mesh, tensor.contiguous())
        work = collective(host_out, host_in, group=mesh.group(axis), async_op=async_op)
        return _finish(mesh, work, [(out, host_out)], async_op)


@graph_break
def all_gather_into(mesh: ParallelMesh, axis: str, out: torch.Tensor, tensor: torch.Tensor, *,
                    tag: str, async_op: bool = False):
    """`out` (n times `tensor` along dim 0) receives every rank's `tensor`. Returns the work
    when `async_op` (None when nothing had to move)."""
    return _into(mesh, axis, "all_gather", tag, out, tensor, out, _all_gather_single, async_op)


@graph_break
def reduce_scatter_into(mesh: ParallelMesh, axis: str, out: torch.Tensor, tensor: torch.Tensor, *,
                        tag: str, async_op: bool = False):
    """`out` receives this rank's 1/n (dim 0) of the sum of every rank's `tensor`."""
    return _into(mesh, axis, "reduce_scatter", tag, out, tensor, tensor, _reduce_scatter_single, async_op)


@graph_break
def all_reduce_async(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str):
    """In-place sum over the `axis` slice, started in the background: wait on the work."""
    n = mesh.size(axis)
    if n == 1:
        return None
    _record(mesh, axis, "all_reduce", tag, _nbytes(tensor), 2 * (n - 1) / n)
    host = _on_host(mesh, tensor)
    return _finish(mesh, dist.all_reduce(host, group=mesh.group(axis), async_op=True), [(tensor, host)], True)


def all_to_all(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, *, tag: str) -> torch.Tensor:
    """Block i of dim 0 (size n) goes to rank i of the `axis` slice; block j of the result
    came from rank j."""
    n = mesh.size(axis)
    if n == 1:
        return tensor
    out = torch.empty_like(tensor)
    all_to_all_into(mesh, axis, out, tensor, tag=tag)
    return out


@graph_break
def all_to_all_uneven(mesh: ParallelMesh, axis: str, tensor: torch.Tensor, send_counts: list[int],
                      recv_counts: list[int], *, tag: str) -> torch.Tensor:
    """Rows [sum(send_counts[:i]), +send_counts[i]) of `tensor` go to rank i of the `axis`
    slice; the result holds recv_counts[j] rows from each rank j, in rank order."""
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    if mesh.size(axis) == 1:
        return out.copy_(tensor)
    row = math.prod(tensor.shape[1:]) * tensor.element_size()  # bytes per row (rows may be none)
    mine = mesh.index(axis)
    sent = (sum(send_counts) - send_counts[mine]) * row
    mesh.ledger.record(axis, "all_to_all", tag, sum(send_counts) * row, sent, mesh.spans_nodes(axis))
    with mesh.ledger.waiting(axis, "all_to_all", tag):
        host_out, host_in = _on_host(mesh, out), _on_host(mesh, tensor.contiguous())
        dist.all_to_all_single(host_out, host_in, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=mesh.group(axis))
        _finish(mesh, None, [(out, host_out)], async_op=False)
    return out


@graph_break
def all_to_all_into(mesh: ParallelMesh, axis: str, out: torch.Tensor, tensor: torch.Tensor, *,
                    tag: str, async_op: bool = False):
    """`out` receives block j (of n along dim 0) from rank j; this rank's block i goes to
    rank i. Returns the work when `async_op`."""
    return _into(mesh, axis, "all_to_all", tag, out, tensor, tensor, dist.all_to_all_single, async_op)


@graph_break
def batch_send_recv(mesh: ParallelMesh, axis: str, sends: list[tuple[torch.Tensor, int, int, str]],
                    recvs: list[tuple[torch.Tensor, int, int]]) -> tuple[list, list]:
    """Point-to-point along `axis` as one batch: sends are (tensor, global peer, tag, ledger
    tag), receives (buffer, global peer, tag). Returns the send and receive works; the
    ledger records each send's bytes (what this rank puts on the wire)."""
    ops, pairs = [], []
    for tensor, peer, tag, purpose in sends:
        mesh.ledger.record(axis, "send", purpose, _nbytes(tensor), _nbytes(tensor),
                           mesh.node_of(peer) != mesh.node_of(mesh.rank))
        host = _on_host(mesh, tensor)
        ops.append(dist.P2POp(dist.isend, host, peer, group=mesh.group(f"{axis}_p2p"), tag=tag))
        pairs.append([])  # nothing comes back from a send
    for buffer, peer, tag in recvs:
        host = _on_host(mesh, buffer)
        ops.append(dist.P2POp(dist.irecv, host, peer, group=mesh.group(f"{axis}_p2p"), tag=tag))
        pairs.append([(buffer, host)])
    works = dist.batch_isend_irecv(ops) if ops else []
    works = [_finish(mesh, work, pair, async_op=True) for work, pair in zip(works, pairs)]
    return works[:len(sends)], works[len(sends):]
