"""Context parallelism against the single-device reference: the attention core (output
and q, k, v gradients) and whole training runs (losses of every step, final parameters),
ring and all-to-all, with GQA and sequence lengths that are not powers of two; the ring's
K/V traffic in the ledger; saved attention bytes per rank; causal FLOP balance."""

import pytest
import torch
import torch.nn.functional as F

from meshpar.config import validate
from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import model_config
from meshpar.parallel.context import causal_pairs, local_positions
from meshpar.train.activations import measure_layer
from reference import fast_config, train_and_report
from test_zero import assert_matches, train_each

REL = 1e-5


def attention_errors(cp: int, impl: str, seq: int, heads: int, kv_heads: int) -> dict:
    """Relative errors of this rank's slice of the output and of the q, k, v gradients."""
    from meshpar.parallel.context import ContextParallelAttention

    mesh = ParallelMesh.build(MeshShape(cp=cp)) if cp > 1 else ParallelMesh.single()
    g = torch.Generator().manual_seed(0)
    b, d = 2, 8
    q = torch.randn(b, heads, seq, d, generator=g, requires_grad=True)
    k = torch.randn(b, kv_heads, seq, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, seq, d, generator=g, requires_grad=True)
    upstream = torch.randn(b, heads, seq, d, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    ref.backward(upstream)
    pos = local_positions(seq, cp, mesh.index("cp"))
    ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    out = ContextParallelAttention(mesh, impl)(ql, kl, vl)
    out.backward(upstream[:, :, pos])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    return {"out": rel(out, ref[:, :, pos]), "dq": rel(ql.grad, q.grad[:, :, pos]),
            "dk": rel(kl.grad, k.grad[:, :, pos]), "dv": rel(vl.grad, v.grad[:, :, pos])}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("impl", ["ring", "all-to-all"])
def test_attention_equals_single_device(worlds, cp, impl):
    # seq 24 and 40: divisible by 2 x cp, not powers of two; GQA 4:2 and 8:2, and MHA
    for seq, heads, kv_heads in ((24, 4, 2), (40, 8, 2), (24, 4, 4)):
        for errors in worlds(cp).run(attention_errors, cp, impl, seq, heads, kv_heads):
            assert max(errors.values()) < REL, (seq, heads, kv_heads, errors)


@pytest.mark.parametrize("flash", [True, False])
def test_ring_blocks_on_one_rank(monkeypatch, flash):
    """The block kernels alone (cp = 1): PyTorch's CPU flash kernel, and the plain formula
    that other devices use, against SDPA."""
    from meshpar.parallel import context

    if not flash:
        monkeypatch.setattr(context, "_FLASH_CPU", None)
        monkeypatch.setattr(context, "_FLASH_CPU_BACKWARD", None)
    errors = attention_errors(1, "ring", 24, 4, 2)
    assert max(errors.values()) < REL, errors


def cp_config(cp: int, impl: str = "ring", steps: int = 10, **parallel):
    cfg = fast_config(steps=steps, seq_len=48)  # 48 = 2 x cp x 6 (cp 4) or x 12 (cp 2)
    cfg.mesh.cp, cfg.context.cp_impl = cp, impl
    for key, value in parallel.items():
        cfg.update(**{key: value})
    return cfg


@pytest.fixture(scope="module")
def reference():
    return train_and_report(cp_config(1))


@pytest.mark.parametrize("world, layouts", [
    (2, [{"cp": 2}, {"cp": 2, "impl": "all-to-all"}]),
    (4, [{"cp": 4}, {"cp": 2, "tp": 2, "sequence_parallel": True}, {"cp": 2, "dp": 2, "zero": 3},
         {"cp": 4, "impl": "all-to-all"}]),
])
def test_training_equals_single_device(worlds, reference, world, layouts):
    configs = [cp_config(**layout) for layout in layouts]
    results = worlds(world).run(train_each, configs)
    for layout, runs in zip(layouts, zip(*results)):
        for rank, run in enumerate(runs):
            assert_matches(run, reference, f"{layout} rank {rank}")


def with_dropout(cfg, p: float = 0.1):
    cfg.model.overrides["dropout"] = p
    return cfg


@pytest.mark.parametrize("world, layouts", [
    (2, [{"cp": 2}]),
    (4, [{"cp": 4}, {"cp": 2, "tp": 2, "sequence_parallel": True}, {"cp": 2, "tp": 2}]),
])
def test_dropout_draws_the_masks_of_one_device(worlds, world, layouts):
    # Each rank draws the whole sequence's mask and keeps its tokens' rows: cp's two chunks,
    # and under SP its tp block of them. Keeping the first rows instead fails at step 1.
    reference = train_and_report(with_dropout(cp_config(1, steps=4)))
    plain = train_and_report(cp_config(1, steps=4))
    assert plain["losses"][0] != reference["losses"][0]  # the masks change the loss
    results = worlds(world).run(train_each, [with_dropout(cp_config(**layout, steps=4)) for layout in layouts])
    for layout, runs in zip(layouts, zip(*results)):
        for rank, run in enumerate(runs):
            assert_matches(run, reference, f"{layout} with dropout, rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"cp": 2, "tp": 2}, {"cp": 2, "dp": 2}, {"cp": 2, "pp": 2, "zero": 1},
                                    {"cp": 2, "tp": 2, "impl": "all-to-all"}])
def test_training_composes(worlds, reference, layout):
    for rank, run in enumerate(worlds(4).run(train_and_report, cp_config(**layout))):
        assert_matches(run, reference, f"{layout} rank {rank}")


def test_gradients_sum_over_cp_where_the_bytes_are_fewest(worlds, reference):
    """dp=2 x cp=2. ZeRO-0: reduce-scatter over cp, all-reduce of the half over dp,
    all-gather over cp - dp carries half the gradient. ZeRO-1: reduce-scatter over dp, then
    all-reduce of the shard over cp - cp carries half. Both equal one device."""
    layouts = [{"cp": 2, "dp": 2, "zero": 0}, {"cp": 2, "dp": 2, "zero": 1}]
    results = worlds(4).run(train_each, [cp_config(**layout) for layout in layouts])
    for layout, runs in zip(layouts, zip(*results)):
        for rank, run in enumerate(runs):
            assert_matches(run, reference, f"{layout} rank {rank}")
            ledger = run["ledger"]
            if layout["zero"] == 0:
                full = ledger[("cp", "reduce_scatter", "grads")].bytes
                assert ledger[("cp", "all_gather", "grads")].bytes == full
                assert ledger[("dp", "all_reduce", "grads")].bytes == full / 2
            else:
                full = ledger[("dp", "reduce_scatter", "grads")].bytes
                assert ledger[("cp", "all_reduce", "grads")].bytes == full / 2
            # every step's fp32 gradient once, and a few elements of padding per bucket
            n, steps = run["summary"]["num_params"], len(run["losses"])
            assert steps * 4 * n <= full <= steps * 4 * (n + 16), (full, n)


def test_ring_kv_traffic_per_layer(worlds):
    cp, steps = 4, 2
    cfg = cp_config(cp)
    cfg.run.steps = steps
    model = cfg.model.resolve()
    for run in worlds(cp).run(train_and_report, cfg):
        # per layer and pass: K and V of this rank's tokens, sent cp - 1 times, i.e.
        # (cp-1)/cp of the full K and V tensors (fp32); forward, and again in backward
        batch = cfg.data.global_batch_size
        full_kv = 2 * batch * cfg.data.seq_len * model.num_kv_heads * model.head_dim * 4
        passes = steps * 2 + 1  # forward and backward per step, forward of the final evaluation
        sent = run["ledger"][("cp", "send", "ring_kv")].bytes
        assert sent == passes * model.num_layers * (cp - 1) / cp * full_kv
        # the K/V gradients travel home in backward: cp hops of this rank's share
        assert run["ledger"][("cp", "send", "ring_dkv")].bytes == steps * model.num_layers * full_kv


def saved_attention_bytes(cp: int) -> int:
    mesh = ParallelMesh.build(MeshShape(cp=cp)) if cp > 1 else ParallelMesh.single()
    return measure_layer(model_config("tiny"), mesh, 2, 48, False)["attention"]


def test_saved_attention_bytes_fall_as_one_over_cp(worlds):
    single = saved_attention_bytes(1)
    for cp in (2, 4):
        for measured in worlds(cp).run(saved_attention_bytes, cp):
            # ring attention saves what flash attention does (q, k, v, output, log-sum-exp)
            # for this rank's tokens only
            assert measured == pytest.approx(single / cp, rel=0.05), (cp, measured, single)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_causal_work_is_balanced(cp):
    chunk = 16
    counts = [causal_pairs(r, cp, chunk) for r in range(cp)]
    mean = sum(counts) / cp
    assert max(abs(c - mean) for c in counts) <= 0.05 * mean
    # every unmasked chunk pair is evaluated exactly once across the ranks (diagonal ones in full)
    assert sum(counts) == (2 * cp) * (2 * cp - 1) // 2 * chunk * chunk + 2 * cp * chunk * chunk
    # the unbalanced layout - rank i holding chunks 2i and 2i+1 - would give the last rank
    # (4cp - 1) / 3 times the first rank's work
    contiguous = [sum(chunk * chunk for q in (2 * r, 2 * r + 1) for k in range(q + 1)) for r in range(cp)]
    assert contiguous[-1] / contiguous[0] == pytest.approx((4 * cp - 1) / 3)


@pytest.mark.parametrize("change, message", [
    ({"cp": 2, "seq_len": 50}, "divisible by 2 x cp = 4"),
    ({"cp": 2, "cp_impl": "spiral"}, "choose one of ring, all-to-all"),
    ({"cp": 4, "tp": 4, "cp_impl": "all-to-all"}, "heads per tp rank (2) divisible by --cp 4"),
])
def test_context_parallel_config_errors(change, message):
    cfg = fast_config()
    for key, value in change.items():
        cfg.update(**{key: value})
    assert any(message in p for p in validate(cfg)), validate(cfg)
