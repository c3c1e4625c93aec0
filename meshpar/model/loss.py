"""Next-token cross entropy that never holds the logits in fp32 all at once.

`F.cross_entropy(logits.float(), ...)` under bf16 autocast writes the logits out twice in
fp32 - the upcast copy and the log-softmax it saves for backward - each 4 bytes per token
per vocabulary entry (2 GiB each for 8 x 2048 tokens and a 32k vocabulary), and backward
writes an fp32 gradient of the same size before casting it down. Here the logits are kept
as they came (bf16 under autocast) and reduced a block of rows at a time: forward saves
one fp32 log-sum-exp per token, backward recomputes softmax block by block straight
into a gradient of the logits' own dtype. In fp32 the values match F.cross_entropy to
round-off; only the order of the reductions differs.

On a GPU the same computations run fused instead (torch.compile generates them, with or
without --compile): forward is one reduction kernel that reads the 16-bit logits and
writes a log-sum-exp per row, backward one pointwise kernel that reads them again and
writes the gradient. No fp32 block exists at all, and the bytes moved fall from about 68
per logit in eager blocks (an upcast, then a kernel per operation) to about 8. The
vocab-parallel loss (meshpar/parallel/tensor.py) uses the same kernels on its slice.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import cache

import torch

# Rows per block: about 2**25 logits (128 MiB in fp32) whatever the vocabulary.
BLOCK_ELEMENTS = 2 ** 25
# Device types whose loss runs as generated kernels (Triton's, through torch.compile);
# elsewhere eager blocks, where compiling would cost more than it saves.
FUSED_ON = ("cuda",)


def row_blocks(rows: int, vocab: int):
    """(start, end) of consecutive blocks of rows, about BLOCK_ELEMENTS logits each."""
    step = max(1, BLOCK_ELEMENTS // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def _shifted_sum_exp(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (logits.float() - shift[:, None]).exp().sum(dim=-1)


def _softmax_minus_one_hot(logits: torch.Tensor, targets: torch.Tensor, logsumexp: torch.Tensor,
                           grad_loss: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(logits) = softmax - one_hot(target), times the upstream gradient (a
    scalar, or one per row as (rows, 1)), in the logits' dtype. A target of -1 hits no
    column. Fused, the one-hot is a comparison per element, never a tensor."""
    probs = (logits.float() - logsumexp[:, None]).exp()
    one_hot = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    return ((probs - one_hot.float()) * grad_loss).to(logits.dtype)


KERNELS = {"logsumexp": _row_logsumexp, "shifted_sum_exp": _shifted_sum_exp,
           "softmax_minus_one_hot": _softmax_minus_one_hot}


@cache
def _compiled(name: str):
    """One kernel, compiled once per process (shapes that change recompile once, as dynamic)."""
    return torch.compile(KERNELS[name], fullgraph=True)


@cache
def _fusion_available(device_type: str) -> bool:
    return device_type != "cuda" or importlib.util.find_spec("triton") is not None


_fusion_failed: list[str] = []  # why generating the kernels failed in this process, once it has


def fused(name: str, *args: torch.Tensor) -> torch.Tensor | None:
    """The generated kernel `name` of KERNELS applied to `args` where this device fuses
    (FUSED_ON), else None: the caller runs eager blocks. A kernel that cannot be generated
    here warns, once, and leaves every later call to the blocks."""
    device = args[0].device
    if device.type not in FUSED_ON or not _fusion_available(device.type) or _fusion_failed:
        return None
    try:
        return _compiled(name)(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # inductor or Triton broken on this machine
        _fusion_failed.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"the fused cross-entropy kernels could not be generated ({_fusion_failed[0][:300]}); "
                      "computing the loss in eager blocks instead", RuntimeWarning, stacklevel=3)
        return None


def shifted_sum_exp(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """sum over each row of exp(logit - shift[row]), in fp32: fused, or a block of rows at a time."""
    total = fused("shifted_sum_exp", logits, shift)
    if total is None:
        total = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start, end in row_blocks(*logits.shape):
            total[start:end] = _shifted_sum_exp(logits[start:end], shift[start:end])
    return total


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logsumexp = fused("logsumexp", logits)
        if logsumexp is None:
            logsumexp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            for start, end in row_blocks(*logits.shape):
                logsumexp[start:end] = _row_logsumexp(logits[start:end])
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, targets, logsumexp)
        return (logsumexp - target_logits).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        grad = fused("softmax_minus_one_hot", logits, targets, logsumexp, grad_loss)
        if grad is not None:
            return grad, None
        grad = torch.empty_like(logits)
        for start, end in row_blocks(*logits.shape):
            block = (logits[start:end].float() - logsumexp[start:end, None]).exp_()
            block.scatter_add_(1, targets[start:end, None], block.new_full((end - start, 1), -1.0))
            grad[start:end] = block.mul_(grad_loss)
        return grad, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed -log softmax(logits)[target] over all tokens, in fp32, from logits (..., vocab)
    of any float dtype and integer targets (...)."""
    return _CrossEntropySum.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
