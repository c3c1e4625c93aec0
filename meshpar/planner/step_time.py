"""Step time of a layout: compute, the exposed communication of each axis, the pipeline
bubble and the optimizer step.

Per micro-batch and pipeline stage (the most loaded one):
- compute: matmul FLOPs at `peak x efficiency.matmul`, attention score FLOPs at
  `peak x efficiency.attention`; backward twice the forward, plus the recomputed forward
  (full: the whole layer; selective: the attention core); the memory-bound element-wise
  work (norms, activation functions, rotary, residual adds) as bytes through HBM at
  `memory_GBps x efficiency.memory`, and the loss over the vocabulary likewise;
- tp: 4 all-reduces (or all-gather + reduce-scatter pairs with SP: the same bytes) of the
  micro-batch's b x s/cp x h activations per layer, forward and backward, over NVLink, not
  overlapped;
- ep (a mixture of experts): 4 all-to-alls of the tokens' k hidden states per layer, to
  the experts and back, forward and backward, on the ep group's links, not overlapped;
  the experts' matmuls k per token, whole on each tp rank;
- cp (ring): cp-1 K/V chunks per layer forward, twice that backward, overlapped with the
  attention they feed: only the excess is exposed;
- pp: one activation send per micro-batch and stage boundary, forward and backward;
  with tied embeddings, once per step, the sum of the first and the last stage's
  gradients of the shared weight (what each keeps of it), not overlapped.
Where calibrated, every operation's fixed cost besides its arithmetic (times the
operations counted per layer) and the model's measured compute over this component model
(`compute_scale`, `optimizer_scale`) scale compute and the optimizer step.
The pipeline then runs m micro-batches with the schedule's bubble (from the simulator).
dp: one reduction of the gradients per step (ZeRO-3 gathers the parameters twice per
micro-batch as well, the linear weights in 16 bits under bf16/fp16), overlapped with the last micro-batch's backward; over NVLink when a
dp group fits in a node, else over the network. With cp, the gradients are summed over cp
too (a reduce-scatter and all-gather around the dp all-reduce of 1/cp at ZeRO-0, an
all-reduce of the dp shard at ZeRO 1-3), not overlapped. The wire format (fp32, 16 bits,
int8 with its element-wise passes), the hierarchical all-reduce and overlap follow the
layout. On nodes sharing one link each (`Cluster.node_link_GBps`), tp and dp collectives
that cross nodes are timed by the bytes leaving a node (network.py), and ZeRO-1/2's
parameter all-gather after the optimizer step is exposed.
"""

from __future__ import annotations

from meshpar.parallel.grad_reduce import INT8_CHUNK
from meshpar.planner.hardware import Cluster
from meshpar.planner.layout import Layout, pipeline_shape
from meshpar.planner.memory import Dtypes, params_per_rank
from meshpar.planner.model import ModelSpec
from meshpar.planner.network import collective_time, node_of

_WIRE_BYTES = {"bf16": 2, "fp16": 2}  # per gradient element on the wire under --grad-compression
# Bytes through memory per gradient element of the int8 scheme (parallel/grad_reduce.py),
# counted op by op: sending - the carried error added (12), quantized (abs, max, divide,
# round, clamp, cast: 45), its error kept (dequantize 13, subtract 12), packed (2);
# receiving - unpacked (2), dequantized (13), the blocks summed (5): 104. ZeRO-0's
# all-gather besides: the summed shard quantized again with its error (10), and every
# shard unpacked, dequantized and copied back (23): 33.
INT8_SEND_BYTES, INT8_ALL_GATHER_BYTES = 104, 33

def _ring_time(payload: float, n: int, GBps: float, efficiency: float, all_reduce: bool = True,
               latency_us: float = 0.0) -> float:
    """Latency plus bytes over bus bandwidth (the alpha-beta model of a ring)."""
    if n == 1:
        return 0.0
    factor = 2 * (n - 1) / n if all_reduce else (n - 1) / n
    return latency_us * 1e-6 + factor * payload / (GBps * 1e9 * efficiency)


def step_time(spec: ModelSpec, layout: Layout, cluster: Cluster, global_batch: int,
              dtypes: Dtypes = Dtypes()) -> dict[str, float]:
    gpu, eff = cluster.gpu, cluster.efficiency
    peak = gpu.peak_tflops * 1e12
    b, s, t, cp = layout.micro_batch_size, spec.seq_len // layout.cp, layout.tp, layout.cp
    tokens = b * s  # per micro-batch on this rank's cp slice
    element = dtypes.activation_bytes  # activations cross tp and cp links in the compute dtype
    # ... but the residual stream crosses pp links: fp32 where the parameters are (meshpar's
    # trainer keeps it fp32 under autocast), 16-bit with 16-bit parameters
    residual_element = 4 if dtypes.param_bytes == 4 else element
    layers = -(-spec.layers // layout.pp)
    m = layout.microbatches(global_batch)

    # compute, per micro-batch and stage (a mixture of experts: each token through its k experts)
    matmul_time = sum(2 * tokens * uses * k * n / (peak * eff.matmul_fraction(min(k, n)))
                      for k, n, uses in _gemms(spec, t))
    attention_fwd = 4 * b * s * spec.seq_len * spec.hidden / 2 / t  # causal: half of the s x s scores
    attention_eff = eff.attention if spec.flash_attention else eff.attention * 0.5
    layer_fwd = matmul_time + attention_fwd / (peak * attention_eff)
    layer_bwd = 2 * matmul_time + 2.5 * attention_fwd / (peak * attention_eff)
    if layout.recompute == "full":
        layer_bwd += layer_fwd
    elif layout.recompute == "selective":
        layer_bwd += attention_fwd / (peak * attention_eff)
    # element-wise passes per layer, forward and backward (elements read plus written):
    # two norms (~6 each over b s h), the MLP's activation (~9 over b s f), rotary on q
    # and k and the residual adds (~8 over b s h); tp splits the MLP, SP the rest
    hbm = gpu.memory_GBps * 1e9 * eff.memory
    elementwise = tokens * element * (
        20 * spec.hidden / (t if layout.sequence_parallel else 1) + 9 * spec.ffn_hidden / t)
    layer_fwd += elementwise / 3 / hbm
    layer_bwd += 2 * elementwise / 3 / hbm
    # output layer and the loss (log-softmax forward and backward over the logits), on the last stage
    head = 2 * tokens * spec.vocab * spec.hidden / t / (peak * eff.matmul)
    head += 4 * tokens * spec.vocab / t * 4 / hbm
    forward = layers * layer_fwd + (head if layout.pp == 1 else head / layout.pp)
    backward = layers * layer_bwd + 2 * (head if layout.pp == 1 else head / layout.pp)
    # every operation's fixed cost (measured where calibrated), a third of it in forward:
    # on a GPU the host launches ahead, so it bounds the time from below; on a CPU it adds
    ops = layers * eff.ops_per_layer * (1 + (layout.recompute == "full") / 3) + eff.ops_outside_layers
    host = ops * eff.op_overhead_us * 1e-6
    if eff.launched_ahead:
        forward, backward = max(forward, host / 3), max(backward, host * 2 / 3)
    else:
        forward, backward = forward + host / 3, backward + host * 2 / 3
    forward, backward = forward * eff.compute_scale, backward * eff.compute_scale

    # tensor parallelism: inside a node (on nodes sharing one link, wherever the placement puts it)
    activation = tokens * spec.hidden * element
    networked = cluster.node_link_GBps is not None
    node = node_of(cluster, layout.tp_across_nodes)
    if networked and layout.sequence_parallel:
        tp_per_layer = 4 * (collective_time(cluster, "all_gather", activation, list(range(t)), node)
                            + collective_time(cluster, "reduce_scatter", activation, list(range(t)), node))
    elif networked:
        tp_per_layer = 4 * collective_time(cluster, "all_reduce", activation, list(range(t)), node)
    elif layout.sequence_parallel:  # an all-gather and a reduce-scatter where an all-reduce was
        tp_per_layer = 8 * _ring_time(activation, t, gpu.intra_node_GBps, eff.intra_collective, all_reduce=False,
                                      latency_us=gpu.intra_node_latency_us)
    else:
        tp_per_layer = 4 * _ring_time(activation, t, gpu.intra_node_GBps, eff.intra_collective,
                                      latency_us=gpu.intra_node_latency_us)
    tp = layers * tp_per_layer
    # expert parallelism: each token's k hidden states to their experts' ranks and back,
    # forward, and their gradients backward - four all-to-alls per layer, not overlapped;
    # over NVLink while an ep group (t x cp x ep consecutive ranks) fits in a node
    ep_comm = 0.0
    if spec.experts and layout.ep > 1:
        inside = t * cp * layout.ep <= cluster.gpus_per_node
        ep_link, ep_eff, ep_latency = ((gpu.intra_node_GBps, eff.intra_collective, gpu.intra_node_latency_us) if inside
                                       else (gpu.inter_node_GBps, eff.inter_collective, gpu.inter_node_latency_us))
        routed = tokens * spec.experts_per_token * spec.hidden * element
        ep_comm = layers * 4 * _ring_time(routed, layout.ep, ep_link, ep_eff, all_reduce=False, latency_us=ep_latency)
    # context parallelism: the ring's K/V (and dK/dV backward) behind the attention
    kv = 2 * b * s * max(1, spec.kv_heads // t) * spec.head_dim * element
    cp_link = gpu.intra_node_GBps if t * cp <= cluster.gpus_per_node else gpu.inter_node_GBps
    cp_latency = gpu.intra_node_latency_us if cp_link == gpu.intra_node_GBps else gpu.inter_node_latency_us
    cp_comm = 3 * (cp - 1) * (kv / (cp_link * 1e9 * eff.intra_collective) + cp_latency * 1e-6) if cp > 1 else 0.0
    hidden_behind = 0.0 if cluster.oversubscribed else 3.5 * attention_fwd / (peak * attention_eff)
    cp_exposed = layers * max(0.0, cp_comm - hidden_behind)
    # pipeline: one activation each way per micro-batch across nodes
    pp_link = gpu.inter_node_GBps if t * cp * layout.dp * layout.pp > cluster.gpus_per_node else gpu.intra_node_GBps
    pp_latency = gpu.inter_node_latency_us if pp_link == gpu.inter_node_GBps else gpu.intra_node_latency_us
    residual = tokens * spec.hidden * residual_element / (t if layout.sequence_parallel else 1)
    pp_send = (pp_latency * 1e-6 + residual / (pp_link * 1e9 * eff.inter_collective)) if layout.pp > 1 else 0.0
    per_microbatch = forward + backward + tp + ep_comm + cp_exposed + 2 * pp_send * layout.virtual_stages
    if networked and cluster.oversubscribed and len({node(r) for r in range(t)}) > 1:
        # tp across nodes on ranks sharing cores: while one tp group waits on the link the
        # others compute, so the cores and the link work side by side - the busier one sets the pace
        per_microbatch -= min(forward + backward, tp)
    shape = pipeline_shape(layout.schedule, layout.pp, layout.virtual_stages, m)
    busy = m * per_microbatch
    pipeline_total = busy if cluster.oversubscribed else busy / (1 - shape.bubble_fraction)

    # data parallelism (a mixture of experts' routed experts over dp / ep: counted as if
    # over dp, at the payload's share - their reduction's ranks are fewer, not faster)
    params = params_per_rank(spec, layout)
    grad_payload = params * dtypes.grad_bytes
    # cp ranks' gradients add up too, where the bytes are fewest (zero.py): ZeRO-0 sums a
    # 1/cp part over dp between a cp reduce-scatter and all-gather; ZeRO 1-3 all-reduce
    # the dp shard over cp at the end. Neither overlaps backward.
    dp_payload = grad_payload / cp if layout.zero == 0 and layout.dp > 1 else grad_payload
    cp_payload = grad_payload / layout.dp if layout.zero >= 1 else grad_payload
    cp_eff = eff.intra_collective if cp_link == gpu.intra_node_GBps else eff.inter_collective
    cp_grads = (_ring_time(cp_payload, cp, cp_link, cp_eff) + (layers + 2) * cp_latency * 1e-6) if cp > 1 else 0.0
    dp_span = t * cp * layout.dp
    dp_link, dp_eff, dp_latency = (
        (gpu.intra_node_GBps, eff.intra_collective, gpu.intra_node_latency_us) if dp_span <= cluster.gpus_per_node
        else (gpu.inter_node_GBps, eff.inter_collective, gpu.inter_node_latency_us))
    # the wire format: fp32 (or the gradients' own dtype), 16 bits, or int8 with a 4-byte
    # scale per 1024 elements - sent as an all-to-all (a reduce-scatter), then all-gathered
    int8 = layout.grad_compression == "int8"
    wire = dp_payload / dtypes.grad_bytes * (1 + 4 / INT8_CHUNK if int8 else _WIRE_BYTES.get(layout.grad_compression,
                                                                                            dtypes.grad_bytes))
    table = spec.embedding_params() / t  # ZeRO-3 gathers linear weights in the compute dtype, the table exact
    gathered = (params - table) * dtypes.gather_bytes + table * dtypes.param_bytes
    units = (layers + 2) * dp_latency * 1e-6 * (layout.dp > 1)  # a collective per unit (layer)
    after_step = 0.0  # ZeRO-1/2: the updated parameters all-gathered after the optimizer step
    if networked:
        dp_ranks = [i * t * cp for i in range(layout.dp)]

        def dp_time(op, payload):
            return collective_time(cluster, op, payload, dp_ranks, node)
        if int8:
            dp_comm = dp_time("all_to_all", wire) + (dp_time("all_gather", wire) if layout.zero == 0 else 0.0)
        elif layout.zero == 0:
            dp_comm = dp_time("hierarchical" if layout.hierarchical else "all_reduce", wire)
        else:
            dp_comm = dp_time("reduce_scatter", wire)
        dp_comm += units
        if layout.zero in (1, 2):
            after_step = dp_time("all_gather", params * dtypes.param_bytes)
        elif layout.zero == 3:
            dp_comm += 2 * m * (dp_time("all_gather", gathered) + layers * dp_latency * 1e-6)
    else:
        if layout.hierarchical and dp_span > cluster.gpus_per_node:  # inside the node, 1/k across, inside again
            k = max(1, cluster.gpus_per_node // (t * cp))
            dp_comm = (_ring_time(wire / k, layout.dp // k, dp_link, dp_eff)
                       + 2 * _ring_time(wire, k, gpu.intra_node_GBps, eff.intra_collective, all_reduce=False))
        else:  # all-reduce, or reduce-scatter + all-gather: the same bytes
            dp_comm = _ring_time(wire, layout.dp, dp_link, dp_eff)
        dp_comm += units
        if layout.zero == 3:  # parameters gathered for forward and again for backward, per micro-batch and layer
            dp_comm += 2 * m * (_ring_time(gathered, layout.dp, dp_link, dp_eff, all_reduce=False)
                                + layers * dp_latency * 1e-6 * (layout.dp > 1))
    if layout.zero == 3:
        overlap = m * (forward + backward)
    else:
        overlap = backward if layout.overlap else 0.0
    # On a shared CPU nothing overlaps - except waiting on a network link, which takes no core
    dp_exposed = (dp_comm if cluster.oversubscribed and not networked else max(0.0, dp_comm - overlap)) + after_step
    if int8 and layout.dp > 1:  # quantizing and decoding: element-wise passes, not hidden
        elements = dp_payload / dtypes.grad_bytes
        dp_exposed += elements * (INT8_SEND_BYTES + INT8_ALL_GATHER_BYTES * (layout.zero == 0)) / hbm
    # optimizer: streaming parameters, gradients and states once
    local = params / (layout.dp if layout.zero >= 1 else 1)
    if layout.offload == "optimizer":
        optimizer = local / eff.host_adam_params_per_s + 2 * local * 4 / (gpu.host_link_GBps * 1e9)
    else:
        state_bytes = dtypes.param_bytes + dtypes.grad_bytes + dtypes.master_bytes + dtypes.moment_bytes
        optimizer = 2 * local * state_bytes / (gpu.memory_GBps * 1e9 * eff.memory) * eff.optimizer_scale

    tied = 0.0
    if spec.tie_embeddings and layout.pp > 1:  # zero.py: an all-reduce over pp_ends
        shared = spec.vocab * spec.hidden / t * dtypes.grad_bytes / (layout.dp if layout.zero >= 1 else 1)
        tied = _ring_time(shared, 2, pp_link, eff.inter_collective, latency_us=pp_latency)

    total = pipeline_total + dp_exposed + cp_grads + tied + optimizer
    return {"compute": m * (forward + backward), "tp": m * tp, "ep": m * ep_comm, "cp": m * cp_exposed + cp_grads,
            "pp": m * 2 * pp_send * layout.virtual_stages + tied, "dp": dp_exposed,
            "bubble": pipeline_total - busy, "optimizer": optimizer, "total": total}


def _gemms(spec: ModelSpec, t: int) -> list[tuple[int, int, int]]:
    """(k, n, uses per token) of each weight matrix of a layer on one tp rank: a mixture
    of experts' experts whole (each token through k of them), its router, its shared
    experts split as an MLP."""
    h, f, kv = spec.hidden, spec.ffn_hidden, spec.kv_heads * spec.head_dim
    if spec.arch == "gpt":
        return [(h, 3 * h // t, 1), (h // t, h, 1), (h, f // t, 1), (f // t, h, 1)]
    attention = [(h, (h + 2 * kv) // t, 1), (h // t, h, 1)]
    if not spec.experts:
        return attention + [(h, 2 * f // t, 1), (f // t, h, 1)]
    k, shared = spec.experts_per_token, spec.shared_experts * f
    return attention + [(h, spec.experts, 1), (h, 2 * f, k), (f, h, k)] + \
        ([(h, 2 * shared // t, 1), (shared // t, h, 1)] if shared else [])
