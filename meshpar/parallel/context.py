"""Context parallelism: the sequence split over the `cp` axis, attention across it.

Layout (causal load balancing): the sequence is cut into 2*cp chunks and rank i holds
chunks i and 2*cp-1-i, so every rank has as many early (cheap) as late (expensive) query
tokens. Everything but attention is token-wise and runs on the local tokens unchanged;
rotary embeddings use each token's global position.

Two attention implementations replace the model's attention core (`Attention.attend`):

ring        Each rank keeps its queries; K and V blocks travel around the ring of cp
            ranks, the next block's send/receive in flight while the current one is
            computed. Partial results merge by log-sum-exp rescaling. Chunk pairs that
            the causal mask hides entirely are skipped. Backward sends K/V round again,
            with their gradient accumulators following them home.
all-to-all  (Ulysses) One all-to-all turns sequence-sharded q, k, v into head-sharded
            ones over the whole sequence; ordinary causal attention runs on heads/cp
            heads; a second all-to-all turns the output back. Needs the (per tp rank)
            heads divisible by cp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from meshpar import comm
from meshpar.graph_breaks import graph_break
from meshpar.mesh import ParallelMesh
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

IMPLEMENTATIONS = ("ring", "all-to-all")


def chunks_of(rank: int, cp: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of the tokens rank `rank` holds, in its local order."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunks_of(rank, cp)])


def visible_blocks(rank: int, owner: int, cp: int, chunk: int):
    """(query rows, key columns, causal) of the chunk pairs that rank `rank`'s queries
    evaluate against rank `owner`'s keys: a key chunk later than the query chunk is hidden
    by the causal mask and skipped; the same chunk is computed with the mask."""
    for qi, qc in enumerate(chunks_of(rank, cp)):
        for ki, kc in enumerate(chunks_of(owner, cp)):
            if kc <= qc:
                yield slice(qi * chunk, (qi + 1) * chunk), slice(ki * chunk, (ki + 1) * chunk), kc == qc


def causal_pairs(rank: int, cp: int, chunk: int) -> int:
    """(query, key) pairs rank `rank` evaluates under ring attention, counted from the
    blocks it computes (diagonal blocks in full: they are computed masked)."""
    return sum(chunk * chunk for owner in range(cp) for _ in visible_blocks(rank, owner, cp, chunk))


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j*g .. (j+1)*g-1."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold_kv_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


class _Ring:
    """Who sends to whom on this rank's cp ring."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh, self.cp, self.rank = mesh, mesh.size("cp"), mesh.index("cp")
        self.next = mesh.peer("cp", (self.rank + 1) % self.cp)
        self.prev = mesh.peer("cp", (self.rank - 1) % self.cp)

    def shift(self, tensor: torch.Tensor, tag: int, purpose: str):
        """Send `tensor` to the next rank, receive the previous rank's; returns the
        receive buffer and the works to wait on."""
        buffer = torch.empty_like(tensor)
        sends, recvs = comm.batch_send_recv(self.mesh, "cp", [(tensor, self.next, tag, purpose)],
                                            [(buffer, self.prev, tag)])
        return buffer, sends + recvs


def _wait(works, mesh: ParallelMesh, tag: str):
    """Wait on a ring step's send and receive, marked for the watchdog as all waits are."""
    with mesh.ledger.waiting("cp", "send_recv", tag):
        for work in works:
            work.wait()


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _block_forward(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query chunk over a key/value chunk (equal head counts): the output
    and the log-sum-exp of each query row's scores, both fp32. On CPU, PyTorch's tiled
    flash kernel; elsewhere the plain formula."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal)
        return out.float(), lse.float()
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(_future(q.shape[2], q.device), -math.inf)
    return torch.softmax(scores, dim=-1) @ v.float(), torch.logsumexp(scores, dim=-1)


def _block_backward(dout, q, k, v, out, lse, causal: bool):
    """Gradients of one block given the *final* output and log-sum-exp of the query rows:
    P = exp(S - lse), dS = P (dP - rowsum(dO O)) - the block's exact share."""
    if q.device.type == "cpu" and _FLASH_CPU_BACKWARD is not None:
        return _FLASH_CPU_BACKWARD(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                   out.contiguous(), lse.contiguous(), 0.0, causal)
    scale = 1 / math.sqrt(q.shape[-1])
    qf, kf, vf, dof = q.float(), k.float(), v.float(), dout.float()
    scores = qf @ kf.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(_future(q.shape[2], q.device), -math.inf)
    p = torch.exp(scores - lse.unsqueeze(-1))
    delta = (dof * out.float()).sum(-1, keepdim=True)
    ds = p * (dof @ vf.transpose(-1, -2) - delta) * scale
    return ds @ kf, ds.transpose(-1, -2) @ qf, p.transpose(-1, -2) @ dof


class RingAttention(torch.autograd.Function):
    """Causal attention over the cp ring; q (b, h, s, d), k and v (b, g, s, d) hold this
    rank's tokens (chunks rank and 2cp-1-rank, s = 2 chunks). Within a step, each of the
    2 x 2 chunk pairs is skipped (key chunk later than the query chunk), computed causally
    (the same chunk) or in full."""

    @staticmethod
    def forward(ctx, q, k, v, mesh: ParallelMesh):
        ring = _Ring(mesh)
        cp, r = ring.cp, ring.rank
        b, h, s, d = q.shape
        chunk = s // 2
        out = torch.zeros(b, h, s, d, device=q.device)
        lse = torch.full((b, h, s), -math.inf, device=q.device)
        kv = torch.stack([k, v])
        for step in range(cp):
            owner = (r - step) % cp
            if step < cp - 1:  # the next block travels while this one is computed
                incoming, works = ring.shift(kv, step, "ring_kv")
            kx, vx = (_expand_kv(t, h) for t in kv)
            for rows, cols, causal in visible_blocks(r, owner, cp, chunk):
                block_out, block_lse = _block_forward(q[:, :, rows], kx[:, :, cols], vx[:, :, cols], causal)
                new_lse = torch.logaddexp(lse[:, :, rows], block_lse)
                out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - new_lse).unsqueeze(-1)
                                   + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
                lse[:, :, rows] = new_lse
            if step < cp - 1:
                _wait(works, mesh, "ring_kv")
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mesh = mesh
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.mesh)
        cp, r = ring.cp, ring.rank
        b, h, s, d = q.shape
        chunk = s // 2
        grad_out = grad_out.to(q.dtype)
        dq = torch.zeros(b, h, s, d, device=q.device)
        kv = torch.stack([k, v])
        dkv_in, dkv_works = None, []
        for step in range(cp):
            owner = (r - step) % cp
            if step < cp - 1:
                incoming, kv_works = ring.shift(kv, 2 * step, "ring_kv")
            kx, vx = (_expand_kv(t, h) for t in kv)
            dk = torch.zeros(b, h, s, d, device=q.device)
            dv = torch.zeros(b, h, s, d, device=q.device)
            for rows, cols, causal in visible_blocks(r, owner, cp, chunk):
                bq, bk, bv = _block_backward(grad_out[:, :, rows], q[:, :, rows], kx[:, :, cols],
                                             vx[:, :, cols], out[:, :, rows], lse[:, :, rows], causal)
                dq[:, :, rows] += bq
                dk[:, :, cols] += bk
                dv[:, :, cols] += bv
            dkv = torch.stack([_fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])])
            if dkv_in is not None:  # the accumulator of this block, from the ranks before
                _wait(dkv_works, ctx.mesh, "ring_dkv")
                dkv = dkv + dkv_in
            # pass it on: after the last step it arrives back at the block's owner
            if cp > 1:
                dkv_in, dkv_works = ring.shift(dkv, 2 * step + 1, "ring_dkv")
            else:
                dkv_in = dkv
            if step < cp - 1:
                _wait(kv_works, ctx.mesh, "ring_kv")
                kv = incoming
        _wait(dkv_works, ctx.mesh, "ring_dkv")
        dk, dv = dkv_in.to(k.dtype).unbind(0)
        return dq.to(q.dtype), dk, dv, None


def _future(chunk: int, device) -> torch.Tensor:
    return torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu(1)


class _AllToAll(torch.autograd.Function):
    """(b, h, s, d) split on heads into cp groups, gathered on the sequence: (b, h/cp, cp*s, d)
    with rank-major token order; backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, mesh: ParallelMesh, to_heads: bool):
        ctx.mesh, ctx.to_heads = mesh, to_heads
        return _exchange(x, mesh, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.mesh, not ctx.to_heads), None, None


def _exchange(x: torch.Tensor, mesh: ParallelMesh, to_heads: bool) -> torch.Tensor:
    cp = mesh.size("cp")
    if to_heads:  # (b, h, s, d) -> (b, h/cp, cp*s, d)
        b, h, s, d = x.shape
        send = x.view(b, cp, h // cp, s, d).transpose(0, 1).contiguous()  # head group j goes to rank j
        recv = comm.all_to_all(mesh, "cp", send, tag="ulysses")  # [source rank] (b, h/cp, s, d)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)
    b, hc, s_full, d = x.shape  # back: (b, h/cp, cp*s, d) -> (b, h, s, d)
    s = s_full // cp
    send = x.view(b, hc, cp, s, d).permute(2, 0, 1, 3, 4).contiguous()  # tokens of rank j go to j
    recv = comm.all_to_all(mesh, "cp", send, tag="ulysses")  # [source rank = head group]
    return recv.transpose(0, 1).reshape(b, cp * hc, s, d)


def ulysses_attention(q, k, v, mesh: ParallelMesh) -> torch.Tensor:
    cp, h = mesh.size("cp"), q.shape[1]
    s = q.shape[2]
    if k.shape[1] % cp:  # too few KV heads to split: give every query head its own copy
        k, v = _expand_kv(k, h), _expand_kv(v, h)
    qh, kh, vh = (_AllToAll.apply(t, mesh, True) for t in (q, k, v))
    # rank-major order -> natural order of positions, and back after attention
    positions = torch.cat([local_positions(s * cp, cp, r, q.device) for r in range(cp)])
    order = torch.argsort(positions)
    qh, kh, vh = (t[:, :, order] for t in (qh, kh, vh))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=kh.shape[1] != qh.shape[1])
    out = out[:, :, torch.argsort(order)]
    return _AllToAll.apply(out, mesh, False)


class ContextParallelAttention:
    """The attention core over the cp axis, in place of `Attention.attend`."""

    def __init__(self, mesh: ParallelMesh, impl: str = "ring"):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown context-parallel implementation {impl!r}; choose one of "
                             f"{', '.join(IMPLEMENTATIONS)}")
        self.mesh, self.impl = mesh, impl

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.impl == "ring":
            return _ring_attention(q, k, v, self.mesh)
        return ulysses_attention(q, k, v, self.mesh)


# Under --compile the ring runs as written: traced, its loop would be compiled again for
# every chunk pair (other slices, causal or not) until dynamo's recompile limit.
@graph_break
def _ring_attention(q, k, v, mesh: ParallelMesh) -> torch.Tensor:
    return RingAttention.apply(q, k, v, mesh)


def context_parallel_problems(num_heads: int, num_kv_heads: int, seq_len: int, cp: int, tp: int,
                              sequence_parallel: bool, impl: str) -> list[str]:
    if cp == 1:
        return []
    found = []
    if seq_len % (2 * cp):
        found.append(f"--seq-len {seq_len} must be divisible by 2 x cp = {2 * cp} (causal load "
                     f"balancing cuts the sequence into 2 x cp chunks)")
    elif sequence_parallel and (seq_len // cp) % tp:
        found.append(f"--sequence-parallel with --cp {cp}: each cp rank's {seq_len // cp} tokens must be "
                     f"divisible by --tp {tp}")
    if impl == "all-to-all" and (num_heads // max(tp, 1)) % cp:
        found.append(f"--cp-impl all-to-all needs the attention heads per tp rank ({num_heads // max(tp, 1)}) "
                     f"divisible by --cp {cp}; use --cp-impl ring")
    return found


@dataclass
class ContextOptions(Section):
    """Context parallelism over cp (its degree is the mesh's)."""

    cp_impl: str = option("ring", "the attention across cp ranks: ring (K/V passed around the ranks) or "
                                  "all-to-all (Ulysses; heads per tp rank divisible by cp)", choices=IMPLEMENTATIONS)

    def problems(self, cfg: Config) -> list[str]:
        model = cfg.model_config()
        if model is None or cfg.mesh.cp <= 1 or cfg.mesh.tp < 1:
            return []
        return context_parallel_problems(model.num_heads, model.num_kv_heads, cfg.data.seq_len, cfg.mesh.cp,
                                         cfg.mesh.tp, cfg.tensor.sequence_parallel, self.cp_impl)
