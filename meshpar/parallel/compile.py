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

import functools
import importlib.util
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config


@dataclass
class CompileOptions(Section):
    """torch.compile of the model's blocks."""

    compile: bool | list[str] = option(False, "torch.compile each transformer block (the first steps pay for "
                                              "compiling); from Python also module-name patterns")

    def problems(self, cfg: Config) -> list[str]:
        """What the code generator needs, there before it fails mid-run."""
        if not self.compile:
            return []
        device, env = cfg.run.device, cfg.environ()
        if device == "cpu":
            compilers = [env["CXX"]] if env.get("CXX") else ["g++", "clang++"]
            if not any(shutil.which(c) for c in compilers):
                return [f"--compile on CPUs needs a C++ compiler for the generated kernels "
                        f"({' or '.join(compilers)} on PATH, or $CXX); install one or drop --compile"]
        elif device == "cuda" and importlib.util.find_spec("triton") is None:
            return ["--compile on GPUs needs triton for the generated kernels (PyTorch's CUDA wheels bring it); "
                    "install it or drop --compile"]
        return []


def apply_compile(layers: list[nn.Module]) -> None:
    """Compile each of `layers` (transformer blocks) in place."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)


def recast_weight_copies() -> None:
    """Compiled blocks cast their 16-bit weight copies again in backward instead of
    saving them - what `weight_casts.RecastWeights` does for eager code, whose hooks
    cannot tell a copy made inside a compiled graph. Inductor's partitioner saves the
    copies: the cast's output feeds a matmul in backward, which bans recomputing it. A
    joint-graph pass marks each 16-bit cast of an fp32 forward input (a weight) as
    must-recompute, so the partitioner saves the fp32 weight - alive anyway, and free to
    save - and casts it again in the backward graph: the same bits, one cast more.

    Process-wide, as `allow_split_backward` (inductor's `joint_custom_pre_pass`,
    replacing any set before); what it changes in other compiled code is what it changes
    here (saving fp32 inputs in place of their 16-bit casts). Graphs dynamo compiled
    before would come back without it, so its cache goes, as there."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    cast_weights_again = _cast_weights_again()
    if not isinstance(inductor_config.joint_custom_pre_pass, cast_weights_again):
        inductor_config.joint_custom_pre_pass = cast_weights_again()
        torch._dynamo.reset()


@functools.cache
def _cast_weights_again() -> type:
    """The joint-graph pass of `recast_weight_copies`: a class made on first use, as its
    base imports inductor (a second of every process's start that never compiles)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class _CastWeightsAgain(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            casts = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)
            for node in graph.nodes:
                if node.op != "call_function" or node.target not in casts:
                    continue
                source = node.args[0]
                if not (isinstance(source, torch.fx.Node) and source.op == "placeholder"
                        and source.name.startswith("primals")):  # forward inputs, not backward's tangents
                    continue
                before, after = source.meta.get("val"), node.meta.get("val")
                if before is not None and after is not None and before.dtype == torch.float32 \
                        and after.dtype in (torch.bfloat16, torch.float16):
                    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE

        def uuid(self):
            return get_hash_for_files((__file__,))

    return _CastWeightsAgain


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
