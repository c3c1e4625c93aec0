"""Activation recomputation: trade compute for the memory of saved activations.

    full        each selected layer keeps only its inputs; the whole layer runs again in
                backward (Chen et al. 2016)
    selective   only the attention core - softmax(QK^T)V - runs again; the linear layers'
                inputs are kept (Korthikanti et al. 2022, Section 5)
    every N     full recomputation of layers N-1, 2N-1, ... (every N-th layer), the rest
                keep everything

PyTorch's non-reentrant checkpoint does the work, with the RNG state saved and restored
so dropout draws the same masks the second time. The wrapped method replaces the
module's own (an instance attribute), so parameter names stay those of the reference.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "full", "selective")


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return run


def recompute_modules(modules: list[nn.Module]) -> None:
    """Full recomputation of each module: its forward keeps only its inputs and runs
    again in backward (any module; the API's `recompute=` patterns)."""
    for module in modules:
        module.forward = _checkpointed(module.forward)


def apply_recompute(layers: dict[int, nn.Module], policy: str, every: int = 1) -> list[int]:
    """Recompute the given layers (index -> TransformerBlock) by `policy`; with full
    recomputation, only every `every`-th layer. Returns the indices recomputed."""
    if policy not in POLICIES:
        raise ValueError(f"unknown recompute policy {policy!r}; choose one of {', '.join(POLICIES)}")
    chosen = []
    for index, layer in layers.items():
        if policy == "full" and (index + 1) % every == 0:
            recompute_modules([layer])
            chosen.append(index)
        elif policy == "selective":
            layer.attention.attend = _checkpointed(layer.attention.attend)
            chosen.append(index)
    return chosen
