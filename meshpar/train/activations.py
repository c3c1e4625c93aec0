"""Bytes of activations a transformer layer saves for backward: measured, and predicted.

Measured: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps;
each is attributed to the child of the layer (norm, attention, mlp, ...) that was running,
counted by its storage (a view holds its whole storage alive), once per region, and
parameters are left out.

Predicted: the method of Korthikanti et al. 2022 (Section 4.1) - list what each op saves
- applied to meshpar's layer: RMSNorm instead of LayerNorm, SwiGLU instead of GeLU, rotary
embeddings, flash-style attention (saves q, k, v, output and the log-sum-exp, not the
s x s scores), no dropout by default.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from meshpar.model.config import ModelConfig
from meshpar.parallel.weight_casts import keep_saved, saved_tensor_hooks

REGIONS = ("attention_norm", "attention", "mlp_norm", "mlp")


def measure_saved_bytes(model: nn.Module, layer: nn.Module, run: Callable[[], object],
                        hooks: Callable = keep_saved) -> dict[str, int]:
    """{region: bytes} that `layer`'s children save while `run()` executes, plus 'total'
    (each storage once across the layer). What the layer saves outside its children (a
    checkpoint's inputs under full recomputation) is the region 'layer'. `hooks(pack,
    unpack)`: the saved-tensor hooks to measure through (e.g. RecastWeights')."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current = [None]
    storages: dict[str, dict[int, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in param_storages:
            storages.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    handles = [layer.register_forward_pre_hook(lambda _m, _a: current.__setitem__(0, "layer")),
               layer.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, None))]
    for name, child in layer.named_children():
        handles.append(child.register_forward_pre_hook(lambda _m, _a, n=name: current.__setitem__(0, n)))
        handles.append(child.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, "layer")))
    try:
        with hooks(pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    out = {name: sum(region.values()) for name, region in storages.items()}
    out["total"] = sum({ptr: n for region in storages.values() for ptr, n in region.items()}.values())
    return out


@contextmanager
def count_saved_bytes(model: nn.Module, hooks: Callable = keep_saved) -> Iterator[dict[str, int]]:
    """{'bytes': ...}: the storages autograd saves while the block runs (each once;
    parameters left out) - one forward's activations, at their peak just before backward.
    `hooks(pack, unpack)`: the saved-tensor hooks to count through (e.g. RecastWeights')."""
    params = list(model.parameters())
    storages: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # Where the parameters are now: ZeRO-3 gathers each unit's into fresh storage.
        if storage.data_ptr() not in {p.untyped_storage().data_ptr() for p in params}:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(storages.values())


def predicted_saved_bytes(cfg: ModelConfig, batch: int, seq: int, tp: int = 1,
                          sequence_parallel: bool = False, bytes_per_element: int = 4,
                          recompute: str = "none") -> dict[str, int]:
    """What `measure_saved_bytes` should find for one layer, region by region, in bytes.
    `bytes_per_element`: 4 computes in fp32; 2 under 16-bit autocast, where the residual
    stream, the norms, the rotary rows and the log-sum-exp stay in fp32 and the rest is
    16-bit. (Autocast's copies of the weights are not counted here: the planner adds
    them where the trainer keeps them.)"""
    b, s, h, t = batch, seq, cfg.hidden_size, tp
    c, fp32 = bytes_per_element, 4
    d = cfg.head_dim
    heads = cfg.num_heads // t
    kv_heads = max(1, cfg.num_kv_heads // t)
    f = cfg.ffn_hidden_size // t
    bsh = b * s * h
    # RMSNorm, in fp32: its input and rsqrt of the mean square (b, s); backward
    # recomputes the normalised input.
    norm = (bsh + b * s) * fp32 // (t if sequence_parallel else 1)
    # The input every column-parallel layer reads, the norm's output in the compute dtype:
    # the full sequence on every tp rank (with SP the all-gathered copy, kept for the
    # weight gradient).
    block_input = bsh * c
    attention = (block_input
                 + s * d * fp32  # rotary cos and sin rows, (s, d/2) each
                 + b * s * heads * d * c  # rotated q
                 + 2 * b * s * kv_heads * d * c  # rotated k, v
                 + b * heads * s * fp32  # log-sum-exp of the scores
                 + b * s * heads * d * c  # attention output
                 + b * s * heads * d * c)  # its (b*s, heads*d) copy, the input of wo
    mlp = block_input + 4 * b * s * f * c  # gate, up, silu(gate), silu(gate)*up
    if cfg.num_experts:
        mlp = block_input + _experts_saved_bytes(cfg, b, s, t, c)
    regions = {"attention_norm": norm, "attention": attention, "mlp_norm": norm, "mlp": mlp}
    if recompute == "selective":  # the attention core's output and log-sum-exp are recomputed
        regions["attention"] -= b * s * heads * d * c + b * heads * s * fp32
    elif recompute == "full":  # only the checkpoint's inputs: the layer input and the rotary rows
        layer_input = bsh // (t if sequence_parallel else 1)
        regions = {"layer": (layer_input + s * d) * fp32}
    # No storage is shared between regions: a norm keeps its input, the block reads
    # its output.
    return {**regions, "total": sum(regions.values())}


def _experts_saved_bytes(cfg: ModelConfig, b: int, s: int, t: int, c: int) -> int:
    """What a mixture of experts keeps besides its input, on one rank (the experts whole on
    each tp rank, every token through k of them): per (token, choice) pair its gathered
    input, the expert's output and its weighted copy (h each), gate, up, silu(gate) and their
    product (ffn each), its ids and weight; per token the router's fp32 probabilities, its
    top-k values and ids and their sum; per sequence the load-balancing loss's expert
    shares; and the shared experts as an MLP split over tp."""
    fp32, h, k, e = 4, cfg.hidden_size, cfg.experts_per_token, cfg.num_experts
    tokens = b * s
    pairs = tokens * k
    per_pair = (3 * h + 4 * cfg.ffn_hidden_size) * c + 2 * 8 + fp32
    per_token = e * fp32 + k * (8 + fp32) + fp32
    shared = 4 * tokens * cfg.shared_experts * cfg.ffn_hidden_size // t * c
    return pairs * per_pair + tokens * per_token + b * e * fp32 * (cfg.aux_loss_coef > 0) + shared


def measure_layer(cfg: ModelConfig, mesh, batch: int, seq: int, sequence_parallel: bool,
                  layer_index: int = 0, recompute: str = "none", cp_impl: str = "ring",
                  precision: str = "fp32") -> dict[str, int]:
    """Saved bytes of one layer of the model parallelized on `mesh`, for one forward in
    `precision` (16-bit: autocast's weight copies cast again in backward, not counted)."""
    from meshpar.model import build_model
    from meshpar.parallel.apply import split_model
    from meshpar.parallel.precision import autocast

    parallel = split_model(build_model(cfg, seed=0), mesh, sequence_parallel=sequence_parallel, recompute=recompute,
                           cp_impl=cp_impl)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = parallel.local_positions(seq)  # context parallelism: this rank's tokens only
    if positions is not None:
        tokens = tokens[:, positions]
    recast = precision != "fp32"

    def forward():
        with autocast(precision, tokens.device, cache=not recast):
            return parallel.module(tokens, positions)

    return measure_saved_bytes(parallel.module, parallel.module.layers[layer_index], forward,
                               saved_tensor_hooks(parallel.module, recast))
