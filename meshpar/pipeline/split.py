"""Layers -> pipeline stages, and the modules one rank holds.

The first stage also holds the embedding, the last the final norm and the output layer.
With tied embeddings the last stage's output layer holds the embedding's weight: two
copies, kept equal by summing their gradients (`sharding.tie`).
A rank holds stages r, r+p, r+2p, ... (virtual stages); its module keeps the reference
model's parameter names (a tied copy answers to its holder's, `sharding.model_names`),
so the full state gathers back by name.
"""

from __future__ import annotations

import torch
from torch import nn

from meshpar.model.config import ModelConfig
from meshpar.model.llama import Transformer


def balanced_split(cfg: ModelConfig, num_stages: int) -> list[int]:
    """Layers per stage, contiguous, minimising the most expensive stage. A layer costs its
    parameter count (matmul FLOPs per token are twice that); the last stage also pays for
    the output layer (vocab x hidden)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.ffn_hidden_size
    head = cfg.vocab_size * h
    L = cfg.num_layers
    # best[s][l]: the smallest possible maximum stage cost putting the first l layers in s stages
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for l in range(s, L - (num_stages - s) + 1):
            for k in range(s - 1, l):  # the stage holds layers k..l-1
                cost = (l - k) * layer + (head if s == num_stages else 0)
                value = max(best[s - 1][k], cost)
                if value < best[s][l]:
                    best[s][l], cut[s][l] = value, k
    counts, l = [], L
    for s in range(num_stages, 0, -1):
        counts.append(l - cut[s][l])
        l = cut[s][l]
    return counts[::-1]


def split_problems(cfg: ModelConfig, num_stages: int, layers: list[int] | None) -> list[str]:
    if num_stages > cfg.num_layers:
        return [f"{num_stages} pipeline stages (pp x virtual stages) but only {cfg.num_layers} layers; "
                f"use at most {cfg.num_layers} stages"]
    if layers is None:
        return []
    found = []
    if len(layers) != num_stages:
        found.append(f"--pp-layers has {len(layers)} entries for {num_stages} stages (pp x virtual stages)")
    if sum(layers) != cfg.num_layers:
        found.append(f"--pp-layers {','.join(map(str, layers))} sums to {sum(layers)}, "
                     f"the model has {cfg.num_layers} layers")
    if any(n < 1 for n in layers):
        found.append("--pp-layers: every stage needs at least one layer")
    return found


class PipelineChunks(nn.Module):
    """The stages one rank holds, under the reference model's parameter names."""

    def __init__(self, model: Transformer, stage_layers: dict[int, range], num_stages: int, seq_shards: int):
        super().__init__()
        self.stage_layers = stage_layers
        self.num_stages = num_stages
        self.seq_shards = seq_shards  # tp under sequence parallelism: hidden states hold s / tp tokens
        self.positions: torch.Tensor | None = None  # this rank's tokens' global positions (context parallelism)
        if 0 in stage_layers:
            self.embedding = model.embedding
        self.layers = nn.ModuleDict({str(i): model.layers[i] for r in stage_layers.values() for i in r})
        if num_stages - 1 in stage_layers:
            self.norm, self.output = model.norm, model.output
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stage(stage, x)

    def forward_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens (first stage) or hidden states in; hidden states or logits (last) out."""
        if stage == 0:
            seq = x.shape[1]
            x = self.embedding(x)
        else:
            seq = x.shape[1] * self.seq_shards
        positions = self.positions if self.positions is not None else torch.arange(seq, device=x.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for i in self.stage_layers[stage]:
            x = self.layers[str(i)](x, cos, sin)
        if stage == self.num_stages - 1:
            x = self.output(self.norm(x))
        return x

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The trainable parameters `forward_stage(stage, .)` uses."""
        modules = [self.layers[str(i)] for i in self.stage_layers[stage]]
        if stage == 0:
            modules.append(self.embedding)
        if stage == self.num_stages - 1:
            modules += [self.norm, self.output]
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def stage_layers_of(counts: list[int]) -> list[range]:
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [range(start, start + n) for start, n in zip(starts, counts)]
