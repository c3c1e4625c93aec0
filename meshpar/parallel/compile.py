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
    first, keeping the graph, the weights' later. A compiled backward may overwrite the
    activations saved for it ("donated buffers", reused for its outputs) only when it
    runs once, so donation is turned off, process-wide: it costs some memory, never a
    result.

    Backwards compiled before, with donation, must not be reused: neither those this
    process compiled for an earlier model (dynamo's cache is per code object, shared by
    every block ever built), nor those on disk - inductor's cache key does not record
    donation, so a backward cached by a run of any other schedule would come back here.
    Reused, it overwrote what the second part still reads: weight gradients 8.5e-4 off
    at tp2 x pp2 and cp2 x pp2 (torch 2.13). So both caches go; compiling afresh costs
    seconds per graph."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    functorch_config.donated_buffer = False
    functorch_config.enable_autograd_cache = False
    inductor_config.fx_graph_cache = False
    torch._dynamo.reset()
