"""torch.compile, one transformer block at a time.

Each block's own forward is compiled (an instance attribute, as recomputation wraps it),
so everything meshpar hangs around a block stays outside the compiled code: ZeRO-3's
gather and free hooks, the pipeline's stage boundaries, recomputation's checkpoint. All
blocks share one compiled graph (same code, same shapes); the embedding, final norm,
output layer and loss run eagerly. Inside a block, the collectives of tensor and context
parallelism are never traced (comm.py disables compilation for each): they are graph
breaks, so the compiled pieces are the compute between them.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(layers: list[nn.Module]) -> None:
    """Compile each of `layers` (transformer blocks) in place."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)


def allow_split_backward() -> None:
    """Zero-bubble schedules run a block's backward in two parts - the input gradient
    first, keeping the graph, the weights' later - which the buffers AOTAutograd donates
    to a compiled backward (saved activations reused for its outputs) do not allow. Turned
    off process-wide: it costs some memory, never a result."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
