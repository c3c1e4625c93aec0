"""Activation recomputation: trade compute for the memory of saved activations.

    full        each selected layer keeps only its inputs; the whole layer runs again in
                backward (Chen et al. 2016)
    selective   only the attention core - softmax(QK^T)V - runs again; the linear layers'
                inputs are kept (Korthikanti et al. 2022, Section 5)
    every N     full recomputation of layers N-1, 2N-1, ... (every N-th layer), the rest
                keep everything
    patterns    any modules by name (the API's `recompute=`), each recomputed whole

Which modules each policy means comes from the model's plan (parallel/apply.py): its
blocks, and its attention modules' `attend` cores.

PyTorch's non-reentrant checkpoint does the work, with the RNG state saved and restored
so dropout draws the same masks the second time. The wrapped method replaces the
module's own (an instance attribute), so parameter names stay those of the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.checkpoint import checkpoint

from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

POLICIES = ("none", "full", "selective")


@dataclass
class RecomputeOptions(Section):
    """Activation recomputation: what backward runs again instead of keeping."""

    recompute: str | list[str] = option("none", "none; full (whole blocks); selective (the attention cores); "
                                                "from Python also module-name patterns", choices=POLICIES)
    recompute_every: int = option(1, "with --recompute full: every N-th block only", at_least=1)

    def problems(self, cfg: Config) -> list[str]:
        if self.recompute_every > 1 and self.recompute != "full":
            return ["--recompute-every applies to --recompute full"]
        return []


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):  # keyword arguments too: transformers' decoder layers take them
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return run


def recompute_modules(modules: list[nn.Module]) -> None:
    """Full recomputation of each module: its forward keeps only its inputs and runs
    again in backward (any module; the API's `recompute=` patterns)."""
    for module in modules:
        module.forward = _checkpointed(module.forward)


def recompute_attention(attentions: list[nn.Module]) -> None:
    """Selective recomputation: each attention's core, its `attend(q, k, v)`, keeps only
    q, k and v and runs again in backward."""
    for attention in attentions:
        attention.attend = _checkpointed(attention.attend)
