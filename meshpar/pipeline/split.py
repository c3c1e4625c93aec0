"""Blocks -> pipeline stages: how many of a model's blocks each stage runs (the modules
a rank then holds: stages.py).
"""

from __future__ import annotations

from torch import nn

from meshpar.model.config import ModelConfig


def stage_costs(model: nn.Module, pipeline) -> tuple[list[int], int]:
    """Each block's cost and the last stage's extra: the elements of their matrices (the
    matmul FLOPs per token are twice that; vectors are negligible). Shapes only: a model
    on the meta device will do."""
    def matrices(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    blocks = model.get_submodule(pipeline.blocks)
    return [matrices(block) for block in blocks], sum(matrices(model.get_submodule(n)) for n in pipeline.last)


def balanced_split(costs: list[int], last_cost: int, num_stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the most expensive stage, where block i
    costs `costs[i]` and the last stage also pays `last_cost` (the output layer)."""
    L = len(costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[s][l]: the smallest possible maximum stage cost putting the first l layers in s stages
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for l in range(s, L - (num_stages - s) + 1):
            for k in range(s - 1, l):  # the stage holds layers k..l-1
                cost = prefix[l] - prefix[k] + (last_cost if s == num_stages else 0)
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


def stage_layers_of(counts: list[int]) -> list[range]:
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [range(start, start + n) for start, n in zip(starts, counts)]
