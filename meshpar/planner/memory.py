"""Bytes per GPU of a layout: parameters, gradients, optimizer states, activations and
buffers, on the busiest rank (the first pipeline stage holds the most micro-batches).

By default the accounting follows meshpar's trainer whatever the compute precision:
parameters and gradients in fp32 (autocast computes in 16 bits from them) and AdamW's two
fp32 moments - 16 bytes per parameter; the parameters are the master weights.
`param_bytes=2, grad_bytes=2, master_bytes=4` reproduces the ZeRO paper's mixed-precision
accounting instead (16-bit parameters and gradients, 12 bytes of fp32 master weights and
moments). ZeRO shards optimizer states (stage 1), then gradients (2), then parameters (3)
over dp; `offload=optimizer` moves the states (and master weights) to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from meshpar.planner.layout import Layout, pipeline_shape
from meshpar.planner.model import ModelSpec

WORKSPACE_BYTES = 2 * 2**30  # CUDA context, cuBLAS and NCCL workspaces, allocator slack
BUCKET_BYTES = 25 * 2**20  # meshpar's gradient bucket


@dataclass(frozen=True)
class Dtypes:
    param_bytes: int = 4
    grad_bytes: int = 4
    master_bytes: int = 0  # a separate fp32 copy of the weights (0: the parameters are the master)
    moment_bytes: int = 8  # AdamW's two moments
    activation_bytes: int = 4  # per activation element: 4 in fp32, 2 in bf16/fp16

    @classmethod
    def for_precision(cls, precision: str, param_bytes: int | None = None, grad_bytes: int | None = None) -> "Dtypes":
        activation = 4 if precision == "fp32" else 2
        p = 4 if param_bytes is None else param_bytes
        g = 4 if grad_bytes is None else grad_bytes
        return cls(p, g, 4 if p < 4 else 0, 8, activation)

    @property
    def gather_bytes(self) -> int:
        """Bytes per linear weight in ZeRO-3's gathers: 16 bits under bf16/fp16, whose
        matmuls read only the weights' 16-bit rounding (meshpar/parallel/param_gather.py)."""
        return min(self.param_bytes, self.activation_bytes)


def expert_params_per_rank(spec: ModelSpec, layout: Layout) -> int:
    """Of `params_per_rank`, a mixture of experts' routed experts: the busiest stage's
    layers' num_experts / ep experts each, whole under tp."""
    return -(-spec.layers // layout.pp) * spec.expert_params() // layout.ep


def params_per_rank(spec: ModelSpec, layout: Layout) -> int:
    """Parameters on the busiest rank before ZeRO-3 sharding: the first pipeline stage's
    layers and embedding (or the last stage's output layer, if larger), over tp. Norm
    gains are replicated over tp; they are counted whole. A tied embedding split over
    stages is held by both ends. A mixture of experts' routed experts are split over ep
    instead, and its router is whole on each tp rank."""
    layers = -(-spec.layers // layout.pp)
    router = spec.hidden * spec.experts
    dense = spec.layer_params() - spec.expert_params() - router
    per_layer = dense // layout.tp + router + spec.expert_params() // layout.ep
    if layout.pp == 1:
        ends = spec.embedding_params() + spec.head_params()
    else:
        copy = spec.vocab * spec.hidden if spec.tie_embeddings else 0  # the last stage's copy of the weight
        ends = max(spec.embedding_params(), spec.head_params() + copy)
    return layers * per_layer + ends // layout.tp


def state_bytes(params: int, dp: int, zero: int, offload_optimizer: bool, dtypes: Dtypes,
                microbatches: int = 1) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer-state) bytes on a rank holding `params` parameters
    at the step's peak: ZeRO shards the optimizer states over dp (stage 1), then the
    gradients (2), then the parameters (3); offloaded states live in host memory (0 here).
    Stages 2-3 keep this rank's reduced shard of the gradients, and with several
    micro-batches per step also every bucket's full gradient buffer from the first
    micro-batch's backward until the last one's reduction (meshpar/parallel/zero/
    reduction.py: the gradients accumulate unreduced), so the full gradients besides."""
    grads = params * dtypes.grad_bytes / (dp if zero >= 2 else 1)
    if zero >= 2 and microbatches > 1:
        grads += params * dtypes.grad_bytes
    return (params * dtypes.param_bytes / (dp if zero >= 3 else 1), grads,
            0.0 if offload_optimizer else params * (dtypes.master_bytes + dtypes.moment_bytes) / (dp if zero else 1))


def layer_activation_bytes(spec: ModelSpec, layout: Layout, dtypes: Dtypes) -> float:
    """Bytes one layer saves for backward per micro-batch on one rank."""
    return _layer_activation_bytes(spec, layout.micro_batch_size, spec.seq_len // layout.cp, layout.tp,
                                   layout.sequence_parallel, layout.recompute, dtypes.activation_bytes)


@lru_cache(maxsize=4096)
def _layer_activation_bytes(spec: ModelSpec, b: int, s: int, t: int, sp: bool, recompute: str,
                            element_bytes: int) -> float:
    if spec.arch == "llama":
        from meshpar.train.activations import predicted_saved_bytes
        return predicted_saved_bytes(spec.as_meshpar(), b, s, t, sp, element_bytes, recompute)["total"]
    # GPT-style (Korthikanti et al. 2022), in units of 16-bit bytes, scaled to the element size
    h, a = spec.hidden, spec.heads
    scores = 0 if spec.flash_attention or recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        per = 2 / (t if sp else 1)
    elif sp:
        per = (34 + scores) / t
    else:
        per = 10 + 24 / t + scores / t
    return s * b * h * per * element_bytes / 2


def head_activation_bytes(spec: ModelSpec, layout: Layout, dtypes: Dtypes) -> float:
    """The final norm (fp32, as every norm), the output layer's input, what the loss keeps
    of the logits, and the token ids: the loss keeps this rank's logits in the compute
    dtype and fp32 per-token statistics (the log-sum-exp; over tp the max and the sum of
    exponentials) - see meshpar/model/loss.py."""
    b, s, t = layout.micro_batch_size, spec.seq_len // layout.cp, layout.tp
    norm = (b * s * spec.hidden + b * s) * 4 + b * s * spec.hidden * dtypes.activation_bytes
    logits = dtypes.activation_bytes * b * s * spec.vocab / t + (4 if t == 1 else 8) * b * s
    return norm + logits + 8 * b * s


def weight_copy_bytes(spec: ModelSpec, layout: Layout, dtypes: Dtypes) -> float:
    """Autocast's 16-bit copies of the matmul weights (fp32 parameters, 16-bit compute),
    kept for backward where the trainer keeps them: one set on a rank without a pipeline
    or ZeRO-3. Elsewhere they are cast again in backward (meshpar/parallel/weight_casts.py)."""
    if dtypes.param_bytes != 4 or dtypes.activation_bytes != 2 or layout.pp > 1 or layout.zero == 3:
        return 0.0
    norms = 4 * spec.hidden if spec.arch == "gpt" else 2 * spec.hidden  # gains (and biases): no matmul
    return 2 * (spec.layers * (spec.layer_params() - norms) + spec.vocab * spec.hidden) / layout.tp


def gradients_follow_activations(layout: Layout, microbatches: int) -> bool:
    """Whether the peak holds the larger of the gradients and the activations, not both.
    One rank on dp and cp at ZeRO-0 with nothing offloaded keeps autograd's own gradients
    (meshpar/parallel/zero/, `direct`; tp sums its few partial ones after backward):
    none exist in the forward, and backward makes them as it frees the activations. With
    one micro-batch per step and no pipeline only: otherwise a later micro-batch's forward
    runs with the gradients present."""
    return (layout.dp == layout.cp == layout.pp == 1 and layout.zero == 0
            and layout.offload == "none" and microbatches == 1)


def model_state_bytes(spec: ModelSpec, layout: Layout, global_batch: int, dtypes: Dtypes) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer-state) bytes of the busiest rank: `state_bytes` of
    its parameters over dp, a mixture of experts' routed experts over the dp ranks holding
    the same ones (dp / ep)."""
    experts = expert_params_per_rank(spec, layout)
    m, offload = layout.microbatches(global_batch), layout.offload == "optimizer"
    dense = state_bytes(params_per_rank(spec, layout) - experts, layout.dp, layout.zero, offload, dtypes, m)
    if not experts:
        return dense
    routed = state_bytes(experts, layout.dp // layout.ep, layout.zero, offload, dtypes, m)
    return tuple(a + b for a, b in zip(dense, routed))


def memory_bytes(spec: ModelSpec, layout: Layout, global_batch: int, dtypes: Dtypes = Dtypes()) -> dict[str, float]:
    params, grads, optimizer = model_state_bytes(spec, layout, global_batch, dtypes)
    shape = pipeline_shape(layout.schedule, layout.pp, layout.virtual_stages, layout.microbatches(global_batch))
    layers_per_chunk = -(-spec.layers // (layout.pp * layout.virtual_stages))
    activations = shape.peak_inflight * layers_per_chunk * layer_activation_bytes(spec, layout, dtypes)
    if layout.pp == 1:
        activations += head_activation_bytes(spec, layout, dtypes)
    activations += weight_copy_bytes(spec, layout, dtypes)
    other = WORKSPACE_BYTES + 2 * BUCKET_BYTES
    if layout.zero == 3:  # two units gathered at once (the one running, the one prefetched)
        received = dtypes.gather_bytes if dtypes.gather_bytes < dtypes.param_bytes else 0  # 16 bits, then upcast
        unit = (spec.layer_params() - spec.expert_params()) / layout.tp + spec.expert_params() / layout.ep
        other += 2 * unit * (dtypes.param_bytes + received)
    if gradients_follow_activations(layout, layout.microbatches(global_batch)):
        total = params + max(grads, activations) + optimizer + other
    else:
        total = params + grads + optimizer + activations + other
    return {"params": params, "grads": grads, "optimizer": optimizer,
            "activations": activations, "other": other, "total": total}
