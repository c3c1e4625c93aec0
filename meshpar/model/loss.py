"""Next-token cross entropy that never holds the logits in fp32 all at once.

`F.cross_entropy(logits.float(), ...)` under bf16 autocast writes the logits out twice in
fp32 - the upcast copy and the log-softmax it saves for backward - each 4 bytes per token
per vocabulary entry (2 GiB each for 8 x 2048 tokens and a 32k vocabulary), and backward
writes an fp32 gradient of the same size before casting it down. Here the logits are kept
as they came (bf16 under autocast) and reduced a block of rows at a time: forward saves
one fp32 log-sum-exp per token, backward recomputes softmax block by block straight
into a gradient of the logits' own dtype. In fp32 the values match F.cross_entropy to
round-off; only the order of the reductions differs.
"""

from __future__ import annotations

import torch

# Rows per block: about 2**25 logits (128 MiB in fp32) whatever the vocabulary.
BLOCK_ELEMENTS = 2 ** 25


def row_blocks(rows: int, vocab: int):
    """(start, end) of consecutive blocks of rows, about BLOCK_ELEMENTS logits each."""
    step = max(1, BLOCK_ELEMENTS // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        logsumexp = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start, end in row_blocks(rows, vocab):
            logsumexp[start:end] = torch.logsumexp(logits[start:end].float(), dim=-1)
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, targets, logsumexp)
        return (logsumexp - target_logits).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        for start, end in row_blocks(rows, vocab):
            # d(loss)/d(logits) = softmax - one_hot(target), times the upstream gradient
            block = (logits[start:end].float() - logsumexp[start:end, None]).exp_()
            block.scatter_add_(1, targets[start:end, None], block.new_full((end - start, 1), -1.0))
            grad[start:end] = block.mul_(grad_loss)
        return grad, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed -log softmax(logits)[target] over all tokens, in fp32, from logits (..., vocab)
    of any float dtype and integer targets (...)."""
    return _CrossEntropySum.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
