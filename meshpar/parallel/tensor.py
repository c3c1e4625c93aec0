"""Megatron-style tensor parallelism over the `tp` axis, with sequence parallelism.

Shoeybi et al. 2019 split each MLP and attention block into a column-parallel half
(weights split by output features, no communication) and a row-parallel half (weights
split by input features, partial sums reduced). Two conjugate mappings bracket a block:

    entering   f: identity forward, all-reduce backward     (SP: all-gather / reduce-scatter)
    leaving    g: all-reduce forward, identity backward     (SP: reduce-scatter / all-gather)

Korthikanti et al. 2022 (sequence parallelism) keep the residual stream and the norms
sharded along the sequence between blocks; the same bytes move, as all-gathers and
reduce-scatters instead of all-reduces. Activations are (batch, seq, hidden): the
sequence is dim 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.model.loss import fused, row_blocks, shifted_sum_exp
from meshpar.options import Section, option
from meshpar.parallel.sharding import FUSED_ATTR, SPEC_ATTR, ShardSpec

if TYPE_CHECKING:
    from meshpar.config import Config

SEQ_DIM = 1


# --- the conjugate mappings ---------------------------------------------------------

class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(ctx.mesh, "tp", grad.contiguous(), tag="tp"), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        if x.is_contiguous():
            ctx.mark_dirty(x)  # reduced in place: autograd must know the input changed
        return comm.all_reduce(mesh, "tp", x.contiguous(), tag="tp")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _gather_sequence(x: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """(b, s/t, h) on each rank -> (b, s, h), rank i's block at [i*s/t, (i+1)*s/t)."""
    if mesh.size("tp") == 1:
        return x
    gathered = comm.all_gather(mesh, "tp", x.movedim(SEQ_DIM, 0), tag="tp")  # (s, b, h)
    # One contiguous (b, s, h) copy: Q, K and V (gate and up) then save the same tensor
    # for their weight gradients instead of each reshaping a strided view into its own.
    return gathered.movedim(0, SEQ_DIM).contiguous()


def _reduce_scatter_sequence(x: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """(b, s, h) partial sums -> this rank's (b, s/t, h) block of the total."""
    if mesh.size("tp") == 1:
        return x
    return comm.reduce_scatter(mesh, "tp", x.movedim(SEQ_DIM, 0), tag="tp").movedim(0, SEQ_DIM)


def _sequence_block(x: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    t = mesh.size("tp")
    return x if t == 1 else x.chunk(t, dim=SEQ_DIM)[mesh.index("tp")].contiguous()


def _sequence_mapping(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd function that runs `forward(x, mesh)` and, in backward, its
    conjugate `backward(grad, mesh)`."""
    def forward_(ctx, x, mesh):
        ctx.mesh = mesh
        return forward(x, mesh)

    def backward_(ctx, grad):
        return backward(grad, ctx.mesh), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_),
                                                   "backward": staticmethod(backward_)})


# Before column layers: gather the sequence; the partial input gradients are summed
# and scattered back.
_GatherFromSequenceParallel = _sequence_mapping("_GatherFromSequenceParallel", _gather_sequence,
                                                _reduce_scatter_sequence)
# After row layers: sum the partial outputs, keep this rank's block.
_ReduceScatterToSequenceParallel = _sequence_mapping("_ReduceScatterToSequenceParallel", _reduce_scatter_sequence,
                                                     _gather_sequence)
# Where the sequence-parallel region begins: keep this rank's block of a replicated
# activation; each rank's gradient is whole for its own tokens, so backward gathers.
_ScatterToSequenceParallel = _sequence_mapping("_ScatterToSequenceParallel", _sequence_block, _gather_sequence)
# Where it ends: the whole sequence again; the gradient that comes back is whole and
# alike on every rank (what follows is replicated, or column-parallel with its own
# all-reduce), so backward keeps this rank's block.
_GatherToReplicated = _sequence_mapping("_GatherToReplicated", _gather_sequence, _sequence_block)


def copy_to_tensor_parallel(x, mesh):
    return _CopyToTensorParallel.apply(x, mesh)


def reduce_from_tensor_parallel(x, mesh):
    return _ReduceFromTensorParallel.apply(x, mesh)


def gather_from_sequence_parallel(x, mesh):
    return _GatherFromSequenceParallel.apply(x, mesh)


def reduce_scatter_to_sequence_parallel(x, mesh):
    return _ReduceScatterToSequenceParallel.apply(x, mesh)


def scatter_to_sequence_parallel(x, mesh):
    """Where the sequence-parallel region begins (a model's first block): keep this
    rank's block of a replicated activation."""
    return _ScatterToSequenceParallel.apply(x, mesh)


def gather_to_replicated(x, mesh):
    """Where the sequence-parallel region ends (after the last block): the whole
    sequence again, replicated."""
    return _GatherToReplicated.apply(x, mesh)


def sum_grads_over_tp(params: list[nn.Parameter], mesh: ParallelMesh, tag: str) -> None:
    """Sum over tp the gradients of replicated parameters that each tp rank computed from
    its share of the tokens (sequence parallelism): one all-reduce for all of them."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    comm.all_reduce(mesh, "tp", flat, tag=tag)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def enter_tensor_parallel(x, mesh: ParallelMesh, sequence_parallel: bool):
    """Before column-parallel layers: the full input, replicated on every tp rank."""
    return gather_from_sequence_parallel(x, mesh) if sequence_parallel else copy_to_tensor_parallel(x, mesh)


def leave_tensor_parallel(x, mesh: ParallelMesh, sequence_parallel: bool):
    """After row-parallel layers: sum the partial outputs (SP: keep this rank's block)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel(x, mesh)
    return reduce_from_tensor_parallel(x, mesh)


def on_first_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `fn` to `module`'s first argument before each call, whether it comes
    positionally or by keyword (transformers calls its attention with hidden_states=...)."""
    def hook(_module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: fn(kwargs[first])}
    module.register_forward_pre_hook(hook, with_kwargs=True)


def on_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `fn` to what `module` returns, or to the first element of a tuple it returns
    (an attention's output beside its weights)."""
    def hook(_module, _args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    module.register_forward_hook(hook)


def bracket(region: nn.Module, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    """Hooks one entering mapping on `region`'s input and one leaving mapping on its
    output: the tp region of a column-to-row pair (an attention, an MLP), whose column
    layers share the one entered input."""
    on_first_input(region, lambda x: enter_tensor_parallel(x, mesh, sequence_parallel))
    on_output(region, lambda y: leave_tensor_parallel(y, mesh, sequence_parallel))


# --- layers --------------------------------------------------------------------------

def _param(local: torch.Tensor, spec: ShardSpec | None = None, fused: int = 1) -> nn.Parameter:
    param = nn.Parameter(local.detach().clone().contiguous())
    if spec is not None:
        setattr(param, SPEC_ATTR, spec)
    if fused > 1:
        setattr(param, FUSED_ATTR, fused)
    return param


def padded_rows(full: torch.Tensor, rows: int, rank: int) -> torch.Tensor:
    """Rows [rank * rows, (rank + 1) * rows) of `full`, zeros past its end (a vocabulary
    that tp does not divide: padded rows no token selects, whose logits the loss masks)."""
    start = rank * rows
    local = full.new_zeros((rows, *full.shape[1:]))
    stop = max(start, min(start + rows, full.shape[0]))
    local[:stop - start] = full.detach()[start:stop]
    return local


class ColumnLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split by output features; x is replicated on
    the tp ranks. Split by whole heads when `heads` is given: with fewer heads than tp
    ranks (a divisor of tp: grouped-query attention's KV heads) each rank holds the one
    head its query heads read, replicated over tp/heads ranks. `fused` parts (q, k, v in
    one projection) are each split on their own. `pad`: the rows are rounded up to a
    multiple of tp with zeros (a vocabulary).

    `enter` says how x arrives: "copy" (replicated: the entering mapping, all-reduce in
    backward), "none" (inside a tp region that entered once for all its column layers)
    or "gather" (where sequence parallelism ends: all-gather the sequence)."""

    matmul_params = ("weight", "bias")  # read only through F.linear (param_gather.py)

    def __init__(self, linear: nn.Linear, mesh: ParallelMesh, fused: int = 1, heads: int | None = None,
                 pad: bool = False):
        super().__init__()
        t, r = mesh.size("tp"), mesh.index("tp")
        self.mesh, self.enter = mesh, "copy"
        rows = linear.out_features
        if heads is not None and heads < t:
            if t % heads or fused > 1:
                raise ValueError(f"{heads} heads over tp={t}: tp must be a multiple of a head count below it")
            replicas, per_head = t // heads, rows // heads
            first = r // replicas * per_head

            def split(tensor):
                return tensor[first:first + per_head]
            spec = ShardSpec("tp", 0, rows, tuple(j * replicas for j in range(heads)), replicas)
        elif pad:
            def split(tensor):
                return padded_rows(tensor, -(-rows // t), r)
            spec = ShardSpec.even("tp", 0, rows, t)
        else:
            if rows % (fused * t) or (heads is not None and heads % t):
                raise ValueError(f"{rows} output features ({heads or fused} part(s)) do not split over tp={t}")

            def split(tensor):
                return torch.cat([part.chunk(t)[r] for part in tensor.chunk(fused)])
            spec = ShardSpec.even("tp", 0, rows, t)
        self.weight = _param(split(linear.weight), spec, fused)
        self.bias = None if linear.bias is None else _param(split(linear.bias), spec, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output features of the full input."""
        if self.enter == "copy":
            x = copy_to_tensor_parallel(x, self.mesh)
        elif self.enter == "gather":
            x = gather_from_sequence_parallel(x, self.mesh)
        return F.linear(x, self.weight, self.bias)


class RowLinear(nn.Module):
    """y = sum over tp of x_local W_local^T, plus the bias once; W split by input features.
    Inside a tp region (`leave` False) the partial sums go out as they are, tp rank 0's
    with the bias, and the region reduces them (sequence parallelism: reduce-scatters)."""

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
            # Every tp rank reads the bias, the others as zeros: its gradient then exists on
            # each, and ZeRO's count of a bucket's gradients completes alike on all of them.
            bias = self.bias if self.bias is None or self.mesh.index("tp") == 0 else self.bias * 0
            return F.linear(x, self.weight, bias)
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.mesh)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """Rows [start, start + rows) of the table on each tp rank (the vocabulary padded to a
    multiple of tp); a token outside them looks up zeros, and the ranks' partial lookups
    are summed - or, where sequence parallelism begins (`scatter`), reduce-scattered
    along the sequence."""

    def __init__(self, embedding: nn.Embedding, mesh: ParallelMesh):
        super().__init__()
        t, r = mesh.size("tp"), mesh.index("tp")
        rows = -(-embedding.num_embeddings // t)
        self.mesh, self.start, self.scatter = mesh, r * rows, False
        self.weight = _param(padded_rows(embedding.weight, rows, r),
                             ShardSpec.even("tp", 0, embedding.num_embeddings, t))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full embeddings, each looked up on the rank owning its row."""
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tensor_parallel(x, self.mesh, sequence_parallel=self.scatter)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[target] from vocab-sharded logits, reducing only
    three (tokens,)-sized tensors over tp: the max (one all-reduce), then the target
    logit and the sum of exponentials (together, one more). The full logits are never
    gathered; like the one-rank loss (meshpar/model/loss.py) the local logits are kept in
    their own dtype and taken to fp32 a block of rows at a time, in forward and again in
    backward, so no fp32 copy of them exists whole."""

    @staticmethod
    def forward(ctx, logits_local, targets, vocab_start, num_valid_local, mesh):
        shape = targets.shape
        logits = logits_local.reshape(-1, logits_local.shape[-1])[:, :num_valid_local]  # padded rows never win
        targets = targets.reshape(-1)
        logits_max = logits.max(dim=-1).values.float()
        comm.all_reduce(mesh, "tp", logits_max, tag="loss", op="max")

        local_target = targets - vocab_start
        outside = (local_target < 0) | (local_target >= num_valid_local)
        safe_target = local_target.masked_fill(outside, 0)
        target_logit = logits.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1).float() - logits_max
        target_logit = target_logit.masked_fill(outside, 0.0)
        sum_exp = shifted_sum_exp(logits, logits_max)
        # Both sums ride one all-reduce: same bytes, one call fewer.
        sums = torch.stack((target_logit, sum_exp))
        comm.all_reduce(mesh, "tp", sums, tag="loss")
        target_logit, sum_exp = sums[0], sums[1]

        ctx.save_for_backward(logits_local, logits_max, sum_exp, safe_target, outside)
        ctx.num_valid_local = num_valid_local
        return (sum_exp.log() - target_logit).view(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits_local, logits_max, sum_exp, safe_target, outside = ctx.saved_tensors
        logits = logits_local.reshape(-1, logits_local.shape[-1])
        grad_loss = grad_loss.reshape(-1)
        valid = logits[:, :ctx.num_valid_local]
        # Fused: the one-rank loss's kernel, with the global log-sum-exp and a target of -1
        # where it lies in another rank's slice.
        local = fused("softmax_minus_one_hot", valid, safe_target.masked_fill(outside, -1),
                      logits_max + sum_exp.log(), grad_loss[:, None])
        if local is not None and valid.shape == logits.shape:
            return local.view_as(logits_local), None, None, None, None
        grad = torch.zeros_like(logits)  # padded columns get none
        if local is not None:
            grad[:, :ctx.num_valid_local] = local
            return grad.view_as(logits_local), None, None, None, None
        hit = (~outside).float()
        for start, end in row_blocks(logits.shape[0], ctx.num_valid_local):
            # softmax over the full vocabulary (its local slice), minus one at the target
            block = (logits[start:end, :ctx.num_valid_local].float() - logits_max[start:end, None]).exp()
            block /= sum_exp[start:end, None]
            block.scatter_add_(-1, safe_target[start:end, None], -hit[start:end, None])
            block *= grad_loss[start:end, None]
            grad[start:end, :ctx.num_valid_local] = block
        return grad.view_as(logits_local), None, None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 num_valid_local: int, mesh: ParallelMesh) -> torch.Tensor:
    """Per-token losses (same shape as `targets`), identical on every tp rank."""
    return _VocabParallelCrossEntropy.apply(logits_local, targets, vocab_start, num_valid_local, mesh)


@dataclass
class TensorOptions(Section):
    """Tensor parallelism over tp (its degree is the mesh's)."""

    sequence_parallel: bool = option(False, "with --tp: shard norms and the residual stream along the sequence "
                                            "(Megatron's sequence parallelism)")

    def problems(self, cfg: Config) -> list[str]:
        tp = cfg.mesh.tp
        if self.sequence_parallel and tp == 1:
            return ["--sequence-parallel needs --tp above 1 (it shards the sequence over the tp ranks)"]
        model = cfg.model_config()
        if model is None or tp < 1:
            return []
        from meshpar.parallel.llama_plan import tensor_parallel_problems
        return tensor_parallel_problems(model, tp, self.sequence_parallel, cfg.data.seq_len)
