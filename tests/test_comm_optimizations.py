"""Compressed gradients (16-bit, int8 with error feedback), the hierarchical all-reduce and
topology-aware placement: wire bytes from the ledger against fp32, training against the
uncompressed run, hierarchical against flat on 8 ranks as 2 nodes x 4."""

import pytest
import torch

from meshpar.config import validate
from meshpar.parallel.grad_reduce import INT8_CHUNK, dequantize, quantize
from reference import fast_config, train_and_report


def comm_config(dp: int, steps: int = 3, zero: int = 0, compression: str = "none", **parallel):
    cfg = fast_config(dp=dp, steps=steps)
    cfg.zero.stage, cfg.reduce.grad_compression = zero, compression
    for key, value in parallel.items():
        cfg.update(**{key: value})
    return cfg


def train_each(configs: list) -> list[dict]:
    return [train_and_report(cfg) for cfg in configs]


def grad_wire(run: dict, field: str = "wire_bytes") -> float:
    return sum(getattr(e, field) for (axis, _op, tag), e in run["ledger"].items()
               if tag == "grads" and axis.startswith("dp"))


def relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# --- the int8 codec, no process group ----------------------------------------------------

def test_int8_quantization_error_is_below_half_a_step():
    x = torch.randn(4 * INT8_CHUNK, generator=torch.Generator().manual_seed(0)) * 3
    x[:INT8_CHUNK] = 0  # an all-zero chunk keeps a zero scale and decodes to zeros
    q, scales = quantize(x, INT8_CHUNK)
    assert q.dtype == torch.int8 and scales.shape == (4,)
    error = (dequantize(q, scales, INT8_CHUNK) - x).view(4, -1).abs().amax(dim=1)
    assert error[0] == 0
    assert torch.all(error <= scales / 2 * (1 + 1e-6))


# --- on ranks ----------------------------------------------------------------------------

def reduce_constant_gradient(steps: int, feedback: bool) -> torch.Tensor:
    """The same gradient reduced `steps` times through int8 (all-reduce); returns the
    summed output minus the exact sum, on this rank."""
    from meshpar.mesh import MeshShape, ParallelMesh
    from meshpar.parallel.grad_reduce import GradReducer

    mesh = ParallelMesh.build(MeshShape(dp=2))
    reducer = GradReducer(mesh, "int8", error_feedback=feedback)
    g = torch.randn(2 * INT8_CHUNK, generator=torch.Generator().manual_seed(mesh.rank)) * 1e-3
    exact = g.clone()
    torch.distributed.all_reduce(exact)
    sent = torch.zeros_like(g)
    for _ in range(steps):
        flat = g.clone()
        reducer.all_reduce("bucket", flat).wait()
        sent += flat
    mesh.destroy()
    return sent - steps * exact


def with_and_without_feedback(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reduce_constant_gradient(steps, True), reduce_constant_gradient(steps, False)


def test_error_feedback_keeps_the_accumulated_error_bounded(worlds):
    """Rounding the same gradient the same way every step biases the sum linearly in the
    steps; error feedback carries the remainder, so the summed error stays below one
    quantization step whatever the number of steps."""
    steps = 40
    with_feedback, without = zip(*worlds(2).run(with_and_without_feedback, steps))
    one_step = 1e-3 * 5 / 127  # a scale's size: max|g| is under 5 sigma, summed over 2 ranks below 2x
    for rank in range(2):
        assert with_feedback[rank].abs().max() < 2 * one_step
        assert without[rank].abs().max() > 5 * with_feedback[rank].abs().max()
    assert torch.equal(with_feedback[0], with_feedback[1])  # replicas decode the same bytes


@pytest.fixture(scope="module")
def dp4_runs(worlds):
    """dp=4, ZeRO 0-2, each compression scheme: a few steps each, in one round trip."""
    cases = [(zero, scheme) for zero in (0, 1, 2) for scheme in ("none", "bf16", "fp16", "int8")]
    results = worlds(4).run(train_each, [comm_config(4, zero=zero, compression=scheme) for zero, scheme in cases])
    return {case: [rank[i] for rank in results] for i, case in enumerate(cases)}


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_wire_bytes_fall_2x_for_16_bits_and_4x_for_int8(dp4_runs, zero):
    fp32 = grad_wire(dp4_runs[(zero, "none")][0])
    for scheme in ("bf16", "fp16"):
        assert grad_wire(dp4_runs[(zero, scheme)][0]) * 2 == fp32, scheme
    ratio = fp32 / grad_wire(dp4_runs[(zero, "int8")][0])
    # 4 bytes become 1 plus a 4-byte scale per chunk, on a buffer padded to dp x chunk
    assert 4 / (1 + 4 / INT8_CHUNK) * 0.99 < ratio < 4, ratio


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_compressed_runs_track_fp32(dp4_runs, zero):
    reference = dp4_runs[(zero, "none")][0]["losses"]
    for scheme, tolerance in (("bf16", 1e-3), ("fp16", 1e-3), ("int8", 1e-2)):
        runs = dp4_runs[(zero, scheme)]
        assert relative_gap(runs[0]["losses"], reference) < tolerance, scheme
        for name, value in runs[0]["params"].items():  # the replicas stay identical
            assert torch.equal(runs[-1]["params"][name], value), (scheme, name)


def test_compression_composes_with_tp_pp_and_accumulation(worlds):
    """bf16 on dp 2 x tp 2 with SP; int8 on dp 2 x pp 2 (1F1B, ZeRO-1, two micro-batches)."""
    tp = comm_config(2, steps=4, compression="bf16", tp=2, sequence_parallel=True)
    pp = comm_config(2, steps=4, zero=1, compression="int8", pp=2)
    pp.data.micro_batch_size = 4
    plain = [comm_config(2, steps=4, tp=2, sequence_parallel=True), comm_config(2, steps=4, zero=1, pp=2)]
    plain[1].data.micro_batch_size = 4
    runs = worlds(4).run(train_each, [tp, pp, *plain])[0]
    assert relative_gap(runs[0]["losses"], runs[2]["losses"]) < 1e-3
    assert relative_gap(runs[1]["losses"], runs[3]["losses"]) < 1e-2
    assert grad_wire(runs[3]) / grad_wire(runs[1]) > 3.9


def test_int8_keeps_tp_replicas_identical(worlds):
    """int8's blocks mix a norm gain's gradient with tp-sharded neighbours, so each tp rank
    rounded it by another scale and the replicas drifted apart (the consistency check
    named layers.0.mlp_norm.weight after one step at dp 2 x tp 2); they are averaged over
    tp after the reduction, in one small all-reduce."""
    configs = [comm_config(2, steps=3, zero=zero, compression="int8", tp=2, check_consistency_every=1,
                           sequence_parallel=sp) for zero, sp in ((0, False), (1, True), (2, False))]
    runs = worlds(4).run(train_each, configs)[0]  # a DivergenceError on any drift
    for run in runs:
        replicas = [e for (axis, _op, tag), e in run["ledger"].items() if tag == "tp_replica_grads"]
        assert len(replicas) == 1 and replicas[0].calls == 3  # one all-reduce per step


def test_int8_with_error_feedback_trains_like_fp32(worlds):
    """100 steps at dp=2: the last 10 losses' mean within 2% of the uncompressed run's."""
    configs = [comm_config(2, steps=100, compression=scheme) for scheme in ("none", "int8")]
    plain, int8 = (run["losses"] for run in worlds(2).run(train_each, configs)[0])
    tail = lambda losses: sum(losses[-10:]) / 10  # noqa: E731
    assert abs(tail(int8) - tail(plain)) / tail(plain) < 0.02


@pytest.fixture(scope="module")
def two_nodes(worlds):
    """8 ranks as 2 nodes x 4, dp=8: flat, hierarchical, hierarchical in bf16; and the
    demo layout with its placement."""
    configs = [comm_config(8, ranks_per_node=4),
               comm_config(8, ranks_per_node=4, hierarchical_allreduce=True),
               comm_config(8, ranks_per_node=4, hierarchical_allreduce=True, compression="bf16")]
    demo = fast_config(dp=2, steps=2, micro_batch_size=4)
    demo.mesh.tp, demo.mesh.pp, demo.mesh.ranks_per_node = 2, 2, 4
    return worlds(8).run(train_each, configs + [demo])


def test_hierarchical_allreduce_equals_flat(two_nodes):
    for rank in two_nodes:
        flat, hierarchical, in_bf16 = rank[:3]
        assert relative_gap(hierarchical["losses"], flat["losses"]) < 1e-6
        for name, value in flat["params"].items():
            diff = (hierarchical["params"][name] - value).norm()
            assert diff <= 1e-6 * value.norm(), name
        assert relative_gap(in_bf16["losses"], flat["losses"]) < 1e-3


def test_hierarchical_allreduce_sends_a_quarter_across_nodes(two_nodes):
    """Per rank and step, B bytes of gradients: the flat ring's 2(n-1)/n B all run at
    inter-node speed; the hierarchical all-reduce sends 2(M-1)/M B/k across M=2 nodes of
    k=4 - a quarter of the 2(M-1)/M B that crossing nodes with whole gradients costs, and
    1/7 of the flat ring."""
    flat, hierarchical = two_nodes[3][:2]
    steps, n, k, m = 3, 8, 4, 2
    grad_bytes = flat["ledger"][("dp", "all_reduce", "grads")].bytes / steps
    assert grad_bytes == 4 * flat["summary"]["num_params"]
    assert grad_wire(flat, "inter_node_bytes") == 2 * (n - 1) / n * grad_bytes * steps
    inter = grad_wire(hierarchical, "inter_node_bytes")
    assert inter == 2 * (m - 1) / m * grad_bytes / k * steps
    assert inter == pytest.approx(grad_wire(flat, "inter_node_bytes") / 7)
    intra = grad_wire(hierarchical) - inter  # reduce-scatter and all-gather among 4
    assert intra == 2 * (k - 1) / k * grad_bytes * steps


def test_placement_keeps_tp_inside_a_node(two_nodes):
    demo = two_nodes[0][3]
    placement = demo["summary"]["placement"]
    assert placement == {"ranks_per_node": 4, "nodes": 2,
                         "axes": {"pp": "across 2 nodes", "dp": "inside a node", "tp": "inside a node"}}
    ledger = demo["ledger"]
    sends = [e for (axis, op, _tag), e in ledger.items() if axis == "pp" and op == "send"]
    assert sends and all(e.inter_node_bytes == e.wire_bytes for e in sends)  # stages meet across nodes
    assert all(e.inter_node_bytes == 0 for (axis, _op, _tag), e in ledger.items() if axis in ("tp", "dp"))


@pytest.mark.parametrize("parallel, train, message", [
    (dict(dp=2, zero=3, grad_compression="int8"), {}, "error feedback keeps a full"),
    (dict(dp=2, grad_compression="int8"), dict(precision="fp16"), "loss scale"),
    (dict(dp=2, grad_compression="gzip"), {}, "choose one of none, bf16, fp16, int8"),
    (dict(dp=4, zero=1, ranks_per_node=2, hierarchical_allreduce=True), {}, "use --zero 0"),
    (dict(dp=4, ranks_per_node=4, hierarchical_allreduce=True), {}, "span nodes"),
    (dict(dp=4, ranks_per_node=2, hierarchical_allreduce=True, grad_compression="int8"), {}, "16 bits"),
    (dict(dp=2, tp=2, ranks_per_node=1), {}, "stays inside a node"),
    (dict(dp=4, ranks_per_node=3), {}, "must divide the world size 4"),
])
def test_invalid_communication_settings_are_refused_with_the_reason(parallel, train, message):
    cfg = fast_config()
    for key, value in parallel.items():
        cfg.update(**{key: value})
    for key, value in train.items():
        cfg.update(**{key: value})
    problems = validate(cfg, env={})
    assert any(message in p for p in problems), problems


def reduction_trace(cfg) -> dict:
    """One step of `cfg` on this rank: its buckets, how many later collectives of a
    reduction started before backward returned, and the seconds blocked after it."""
    from reference import trainer_on_this_rank

    with trainer_on_this_rank(cfg) as trainer:
        trainer.train_step()
        events, buckets = list(trainer.data_parallel.events), len(trainer.data_parallel.buckets)
    at = {what: t for t, what, _ in events if what in ("backward_done", "reduced")}
    return {"buckets": buckets, "blocked_s": at["reduced"] - at["backward_done"],
            "advanced_in_backward": sum(t < at["backward_done"] for t, what, _ in events if what == "advance")}


@pytest.mark.parametrize("dp, options, later_collectives", [
    (4, dict(ranks_per_node=2, hierarchical_allreduce=True), 2),  # across nodes, then inside
    (2, dict(compression="int8"), 1),  # the all-gather of the re-quantized sums
])
def test_multi_collective_reductions_proceed_during_backward(worlds, dp, options, later_collectives):
    """The hierarchical all-reduce and int8's all-reduce are chains of collectives: each
    later one starts at a later bucket's launch, inside backward, so only the last
    buckets' remain after it (before, every bucket's ran after backward)."""
    cfg = comm_config(dp, steps=1, bucket_mb=0.05, **options)
    for trace in worlds(dp).run(reduction_trace, cfg):
        buckets = trace["buckets"]
        assert buckets > 4
        # bucket i's k-th later collective starts at launch i + k: all but the last buckets' in backward
        assert trace["advanced_in_backward"] == later_collectives * buckets - later_collectives * (
            later_collectives + 1) // 2, trace
