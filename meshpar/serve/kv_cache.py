"""A KV cache in place of an attention core, with a slot per sequence being generated.

Every model meshpar splits runs its causal attention through a Plan's `attention` cores,
`attend(q, k, v)` on q, k, v of the tokens being computed, after the rotary embedding
(meshpar's Llama by its own method, transformers' models through the attention function
meshpar registers). Generation replaces each core by a `KVCache`: it writes the new keys
and values into their sequences' slots and attends the new queries over all of a
sequence's tokens so far. The model knows nothing of it. Under tensor parallelism each
rank's attention holds its own heads, so each rank caches its own KV heads (the one
replicated head too, where tp exceeds the KV heads); under a pipeline each stage caches
its own layers.

The cache is allocated once, (slots, KV heads, positions, head dim), on the first forward
(when the heads and dtype are known): a batch of sequences of different lengths shares
it, each row of a forward naming its slot and the position its new tokens start at
(`Rows`, set by the engine before each forward and shared by every layer's cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rows:
    """What the current forward computes: for each row of the batch, its sequence's slot
    and the position its `new` tokens start at."""

    slots: list[int]
    starts: list[int]
    new: int

    def positions(self, device=None) -> torch.Tensor:
        """(rows, new) every new token's position in its sequence."""
        return torch.tensor(self.starts, device=device)[:, None] + torch.arange(self.new, device=device)


class KVCache:
    """One attention core's keys and values for `slots` sequences of up to `positions`
    tokens each."""

    def __init__(self, rows: Rows, slots: int, positions: int):
        self.rows, self.slots, self.positions = rows, slots, positions
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def nbytes(self) -> int:
        """The bytes this cache holds (allocated for every slot and position)."""
        return 0 if self.k is None else self.k.numel() * self.k.element_size() * 2

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of each row's new queries over its sequence's cached tokens and the new
        ones: query i of n new tokens sees the keys up to its own position."""
        if self.k is None:
            shape = (self.slots, k.shape[1], self.positions, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        rows, new, gqa = self.rows, q.shape[2], k.shape[1] != q.shape[1]
        if len(rows.slots) == 1:  # one sequence (a prompt, or a batch of one): no padding
            slot, start = rows.slots[0], rows.starts[0]
            self.k[slot, :, start:start + new] = k[0]
            self.v[slot, :, start:start + new] = v[0]
            keys, values = self.k[slot:slot + 1, :, :start + new], self.v[slot:slot + 1, :, :start + new]
            if start == 0:  # the prompt: plain causal attention
                return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
            visible = None if new == 1 else torch.ones(new, start + new, dtype=torch.bool,
                                                       device=q.device).tril(start)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)
        slots = torch.tensor(rows.slots, device=q.device)
        positions = rows.positions(q.device)  # (rows, new)
        self.k[slots[:, None], :, positions] = k.transpose(1, 2)
        self.v[slots[:, None], :, positions] = v.transpose(1, 2)
        total = max(rows.starts) + new
        keys, values = self.k[slots, :, :total], self.v[slots, :, :total]
        # row r's query i sees positions up to its own; the slots' older contents beyond stay hidden
        visible = torch.arange(total, device=q.device) <= positions[:, :, None]  # (rows, new, total)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None], enable_gqa=gqa)
