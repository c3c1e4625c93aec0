"""A KV cache in place of an attention core.

Every model meshpar splits runs its causal attention through a Plan's `attention` cores,
`attend(q, k, v)` on q, k, v of the tokens being computed, after the rotary embedding
(meshpar's Llama by its own method, transformers' models through the attention function
meshpar registers). Generation replaces each core by a `KVCache`: it appends the new keys
and values to those of the tokens before, and attends the new queries over all of them.
The model knows nothing of it, and under tensor parallelism each rank's attention holds
its own heads, so each rank caches its own KV heads - the one replicated head too, where
tp exceeds the KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """One attention core's keys and values so far, (batch, kv heads, tokens, head dim)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.numel() * self.k.element_size() * 2

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the new queries over every cached token and the new ones: query i
        of n new tokens sees the keys up to its own position (causal, aligned at the end)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        new, total = q.shape[2], self.k.shape[2]
        gqa = self.k.shape[1] != q.shape[1]
        if new == total:  # the prompt: plain causal attention
            return F.scaled_dot_product_attention(q, self.k, self.v, is_causal=True, enable_gqa=gqa)
        visible = None
        if new > 1:  # several new tokens after cached ones: each sees up to itself
            visible = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=visible, enable_gqa=gqa)
