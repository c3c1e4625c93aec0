"""A GPT-2-style model written the ordinary way - LayerNorm, GeLU MLP of 4h, learned
positions, biases, a fused QKV projection - that knows nothing of meshpar; and the plan
that tells meshpar how to split it. meshpar's own code never imports this file."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, hidden: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(hidden, 3 * hidden)  # q, k, v fused
        self.c_proj = nn.Linear(hidden, hidden)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, s, -1)))


class MLP(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.c_proj = nn.Linear(4 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, hidden: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(hidden), Attention(hidden, n_head, dropout)
        self.ln_2, self.mlp = nn.LayerNorm(hidden), MLP(hidden, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, vocab: int = 256, hidden: int = 64, layers: int = 4, n_head: int = 4, max_len: int = 128,
                 seed: int = 0, tie: bool = False, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)  # GPT-2's three places: embeddings, attention and MLP outputs
        self.h = nn.ModuleList(Block(hidden, n_head, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:  # as GPT-2 does: the output layer is the token embedding
            self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def embed(self, tokens):
        return self.drop(self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device)))

    def head(self, x):
        return self.lm_head(self.ln_f(x))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.h:
            x = block(x)
        return self.head(x)


def gpt2_init(layers: int = 4):
    """GPT-2's initialization as a rule per parameter name, for a model built on the meta
    device (`meshpar.parallelize(..., init=gpt2_init())`): each rank then draws only its
    own share, and every layout starts from the same values."""
    import meshpar

    def rule(name: str) -> "meshpar.InitRule":
        if name.endswith("bias"):
            return meshpar.InitRule("zeros")
        if ".ln_" in name or name.startswith("ln_"):
            return meshpar.InitRule("ones")
        return meshpar.InitRule("normal", 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)
    return rule


def gpt2_plan(hidden: int = 64):
    """How meshpar splits GPT2: Megatron's column-then-row pairs, the vocabulary over tp,
    each attention's head count divided by tp, the pipeline's three parts, and the tp
    regions (each holding a column-to-row pair) that sequence parallelism brackets."""
    import meshpar

    return meshpar.Plan(
        column={"h.*.attn.c_attn": 3, "h.*.mlp.c_fc": 1},  # q, k and v each split by heads
        row=["h.*.attn.c_proj", "h.*.mlp.c_proj"],
        vocab_embedding=["wte"],
        vocab_output="lm_head",
        divide_by_tp={"h.*.attn": ["n_head"]},
        tp_regions=["h.*.attn", "h.*.mlp"],
        pipeline=meshpar.PipelinePlan(blocks="h", first=["wte", "wpe", "drop"], last=["ln_f", "lm_head"],
                                      embed=GPT2.embed, head=GPT2.head, hidden_size=hidden),
    )
