"""The planner against what can be counted: parameter counts of real models, model-state
and activation bytes measured in training, the pipeline simulator, the ZeRO paper's
formulas; and its command line."""

import json

import pytest
import torch

from meshpar.cli import main
from meshpar.model import build_model, model_config
from meshpar.model.config import PRESETS as MESHPAR_PRESETS
from meshpar.pipeline.check import Costs, simulate
from meshpar.pipeline.schedules import build_schedule
from meshpar.planner.hardware import make_cluster
from meshpar.planner.layout import Layout, pipeline_shape
from meshpar.planner.memory import Dtypes, memory_bytes
from meshpar.planner.model import PRESETS, from_hf_config
from meshpar.planner.search import parse_fix, plan
from reference import fast_config, train_and_report


def layout(dp=1, tp=1, pp=1, cp=1, zero=0, schedule="none", v=1, mbs=16, sp=False, recompute="none"):
    return Layout(dp, tp, pp, cp, zero, schedule, v, mbs, sp, recompute, "none")


# --- parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MESHPAR_PRESETS))
def test_parameter_count_equals_the_real_model(name):
    cfg = model_config(name)
    with torch.device("meta"):
        model = build_model(cfg, seed=0, device=torch.device("meta"))
    assert PRESETS[name].params() == sum(p.numel() for p in model.parameters())


def test_gpt_parameter_counts(tmp_path):
    # GPT-2 small, as Hugging Face counts it (tied embeddings): 124,439,808
    config = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_hf_config(tmp_path / "config.json").params() == 124_439_808
    assert abs(PRESETS["gpt3-175b"].params() / 175e9 - 1) < 0.01


def test_llama_hf_config_matches_the_preset(tmp_path):
    config = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672, "vocab_size": 128256, "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_hf_config(tmp_path / "config.json").params() == PRESETS["llama3-70b"].params()


# --- model state against training -----------------------------------------------------------

def state_runs(dp: int) -> list[dict]:
    runs = []
    for zero in range(4):
        cfg = fast_config(dp=dp, steps=1)
        cfg.zero.stage = zero
        runs.append(train_and_report(cfg)["summary"]["model_state_bytes_per_rank"][0])
    return runs


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_model_state_bytes_equal_training(worlds, dp):
    measured = state_runs(dp) if dp == 1 else worlds(dp).run(state_runs, dp)[0]
    spec = PRESETS["tiny"]
    for zero, state in enumerate(measured):
        predicted = memory_bytes(spec, layout(dp=dp, zero=zero, mbs=16 // dp), 16)
        for part in ("params", "grads", "optimizer"):
            assert predicted[part] == state[part], (dp, zero, part)


def moe_state_runs(ep: int) -> list[dict]:
    from meshpar.config import ModelSection

    runs = []
    for zero in range(4):
        cfg = fast_config(dp=2, steps=1, ep=ep)
        cfg.model = ModelSection("tiny-moe")
        cfg.zero.stage = zero
        runs.append(train_and_report(cfg)["summary"]["model_state_bytes_per_rank"][0])
    return runs


@pytest.mark.parametrize("ep", [1, 2])
def test_a_mixture_of_experts_state_bytes_equal_training(worlds, ep):
    """tiny-moe at dp2: at ep2 each rank holds half the experts, whose states ZeRO does not
    shard further (the dp ranks holding the same experts: 1), the rest sharded over dp2."""
    measured = worlds(2).run(moe_state_runs, ep)[0]
    for zero, state in enumerate(measured):
        predicted = memory_bytes(PRESETS["tiny-moe"], Layout(2, 1, 1, 1, zero, "none", 1, 8, False, "none", "none",
                                                             ep), 16)
        for part in ("params", "grads", "optimizer"):
            assert predicted[part] == state[part], (ep, zero, part, predicted[part], state[part])


def peak_gradient_bytes(cfg) -> int:
    """On this rank: the most gradient bytes held at once during a run (full buffers and
    shards, as `state_bytes` counts them), read at every launch of a bucket's reduction."""
    from meshpar.parallel.zero.reduction import GradientReduction

    launch, peak = GradientReduction._launch, 0

    def measuring(self, b):
        nonlocal peak
        peak = max(peak, sum(t.numel() * t.element_size() for x in self.buckets
                             for t in (x.grad_flat, x.grad_shard) if t is not None))
        launch(self, b)
    GradientReduction._launch = measuring
    try:
        train_and_report(cfg)
    finally:
        GradientReduction._launch = launch
    return peak


@pytest.mark.parametrize("zero", [2, 3])
def test_gradient_bytes_under_accumulation_equal_the_trainers_peak(worlds, zero):
    """ZeRO-2/3 with 4 micro-batches: every bucket's full gradient buffer lives from the
    first micro-batch's backward to the last one's reduction, beside this rank's shard;
    the planner counts both, as the trainer holds them mid-step (at rest only the shard)."""
    cfg = fast_config(dp=2, steps=2, micro_batch_size=2)
    cfg.zero.stage = zero
    measured = worlds(2).run(peak_gradient_bytes, cfg)[0]
    predicted = memory_bytes(PRESETS["tiny"], layout(dp=2, zero=zero, mbs=2), 16)
    assert predicted["grads"] == measured == 1.5 * 4 * PRESETS["tiny"].params()


def state_per_rank(cfg) -> list[dict]:
    return train_and_report(cfg)["summary"]["model_state_bytes_per_rank"]


def test_a_tied_embedding_split_over_stages_is_counted_on_both_ends(worlds):
    """pp2 with tied embeddings: the last stage holds the weight too, so it is the
    busiest rank by the final norm; the planner's count equals the trainer's."""
    import dataclasses

    cfg = fast_config(steps=1, model={"tie_embeddings": True}, micro_batch_size=4)
    cfg.mesh.pp = 2
    measured = worlds(2).run(state_per_rank, cfg)[0]
    spec = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True, seq_len=cfg.data.seq_len)
    predicted = memory_bytes(spec, layout(pp=2, schedule="1f1b", mbs=4), 16)
    assert predicted["params"] == max(rank["params"] for rank in measured)
    assert measured[1]["params"] - measured[0]["params"] == 4 * spec.hidden  # the last stage's norm gain


def test_one_rank_with_one_micro_batch_holds_gradients_or_activations_not_both():
    # The trainer keeps autograd's gradients there (zero.py's `direct`): backward makes
    # them as it frees the activations. A second micro-batch's forward runs beside them.
    spec = PRESETS["llama-1.4b"]
    one = memory_bytes(spec, layout(mbs=8), 8)
    parts = one["params"] + one["optimizer"] + one["other"]
    assert one["total"] == parts + max(one["grads"], one["activations"])
    two = memory_bytes(spec, layout(mbs=4), 8)
    assert two["total"] == two["params"] + two["optimizer"] + two["other"] + two["grads"] + two["activations"]
    dp2 = memory_bytes(spec, layout(dp=2, mbs=4), 8)  # a reduction needs its buffer
    assert dp2["total"] == sum(v for k, v in dp2.items() if k != "total")
    tp2 = memory_bytes(spec, layout(tp=2, mbs=8), 8)  # tp sums its partial gradients after backward
    assert tp2["total"] == tp2["params"] + tp2["optimizer"] + tp2["other"] + max(tp2["grads"], tp2["activations"])


def test_zero_paper_accounting():
    """16-bit parameters and gradients plus 12 bytes of fp32 master and moments: 16 Psi,
    4 Psi + 12 Psi/N, 2 Psi + 14 Psi/N, 16 Psi/N (Rajbhandari et al. 2020)."""
    spec, n = PRESETS["llama3-8b"], 64
    psi = spec.params()
    dtypes = Dtypes.for_precision("bf16", param_bytes=2, grad_bytes=2)
    expected = [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n]
    for zero, bytes_ in enumerate(expected):
        m = memory_bytes(spec, layout(dp=n, zero=zero, mbs=1), n, dtypes)
        assert m["params"] + m["grads"] + m["optimizer"] == pytest.approx(bytes_, rel=1e-12)


# --- activations against training -----------------------------------------------------------

ACTIVATION_CASES = [  # (model, dp, tp, pp, sp, recompute, schedule, micro-batch, precision)
    ("tiny", 1, 1, 1, False, "none", "none", 16, "fp32"),
    ("tiny", 1, 2, 1, False, "none", "none", 16, "fp32"),
    ("tiny", 1, 2, 1, True, "selective", "none", 16, "fp32"),
    ("tiny", 1, 4, 1, True, "none", "none", 16, "fp32"),
    ("tiny", 1, 1, 1, False, "full", "none", 16, "fp32"),
    ("tiny", 1, 1, 2, False, "none", "1f1b", 4, "fp32"),
    ("tiny", 1, 2, 2, True, "selective", "1f1b", 4, "fp32"),
    ("small", 1, 2, 1, True, "none", "none", 16, "fp32"),
    ("small", 1, 1, 2, False, "none", "1f1b", 4, "fp32"),
    # bf16: the norms and the residual stream in fp32; one rank keeps autocast's weight copies
    ("tiny", 1, 1, 1, False, "none", "none", 16, "bf16"),
    ("small", 1, 1, 1, False, "none", "none", 16, "bf16"),
    ("small", 1, 2, 1, True, "selective", "none", 16, "bf16"),
    ("small", 1, 1, 2, False, "none", "1f1b", 4, "bf16"),
]


def activation_runs(cases: list) -> list[list[int]]:
    out = []
    for name, dp, tp, pp, sp, recompute, schedule, mbs, precision in cases:
        cfg = fast_config(dp=dp, steps=1, tp=tp, sequence_parallel=sp, micro_batch_size=mbs, precision=precision)
        cfg.model.name = name
        cfg.mesh.pp, cfg.recompute.recompute = pp, recompute
        if pp > 1:
            cfg.pipeline.schedule = schedule
        out.append(train_and_report(cfg)["summary"]["activation_bytes_per_rank"])
    return out


def test_activation_bytes_within_3_percent_of_training(worlds):
    """fp32 and bf16 (measured 2026-11-27: within 2.6%; bf16 was 25-33% under before the
    norms and the residual stream were counted in fp32 and the weight copies at all)."""
    by_world: dict[int, list] = {}
    for case in ACTIVATION_CASES:
        by_world.setdefault(case[1] * case[2] * case[3], []).append(case)
    for world, cases in by_world.items():
        measured = activation_runs(cases) if world == 1 else worlds(world).run(activation_runs, cases)[0]
        for case, per_rank in zip(cases, measured):
            name, dp, tp, pp, sp, recompute, schedule, mbs, precision = case
            spec = PRESETS[name].__class__(**{**PRESETS[name].__dict__, "seq_len": 64})
            predicted = memory_bytes(spec, layout(dp, tp, pp, 1, 0, schedule, 1, mbs, sp, recompute), 16,
                                     Dtypes.for_precision(precision))
            assert abs(predicted["activations"] / per_rank[0] - 1) < 0.03, (case, predicted["activations"], per_rank)


# --- pipeline ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, pp, v", [("1f1b", 4, 1), ("interleaved-1f1b", 4, 2), ("zb-h1", 8, 1)])
def test_pipeline_shape_extrapolates_the_simulator_exactly(schedule, pp, v):
    for m in (pp, 4 * pp, 5 * pp, 8 * pp):
        sim = simulate(build_schedule(schedule, pp, v, m), Costs(1.0, 1.0, 1.0))
        shape = pipeline_shape(schedule, pp, v, m)
        assert shape.bubble_fraction == pytest.approx(sim.bubble_fraction, abs=1e-12)
        assert shape.peak_inflight == max(sim.peak_inflight_microbatches)


# --- search -----------------------------------------------------------------------------

def test_fixed_layout_that_does_not_fit_still_gets_its_prediction():
    cluster = make_cluster("h100-80gb", 8, 8)
    fixed = parse_fix("dp=8,tp=1,pp=1,cp=1,zero=0,micro_batch_size=8,recompute=none,offload=none,"
                      "sequence_parallel=false")
    candidates = plan(PRESETS["llama3-8b"], cluster, 64, fixed=fixed)
    assert len(candidates) == 1 and not candidates[0].fits
    assert candidates[0].memory["total"] > 80e9 and candidates[0].time["total"] > 0


def test_search_prefers_what_fits_and_recomputation_trades_time_for_memory():
    cluster = make_cluster("h100-80gb", 64, 8)
    candidates = plan(PRESETS["llama3-8b"], cluster, 256)
    fits = [c.fits for c in candidates]
    assert fits == sorted(fits, reverse=True) and fits[0]
    times = [c.time["total"] for c in candidates if c.fits]
    assert all(a <= b + 1e-9 for a, b in zip(times, times[1:]))  # ties broken by memory
    base = dict(dp=8, tp=8, pp=1, cp=1, zero=1, schedule="none", virtual_stages=1, micro_batch_size=4,
                sequence_parallel=True, offload="none")
    none, full = (plan(PRESETS["llama3-8b"], cluster, 256, fixed={**base, "recompute": r})[0] for r in ("none", "full"))
    assert full.memory["activations"] < none.memory["activations"] / 5
    assert full.time["compute"] > none.time["compute"] * 1.2


@pytest.mark.parametrize("text, message", [
    ("tp=8,foo=1", "with keys dp, tp"),
    ("tp=eight", "expected an integer"),
    ("sequence_parallel=maybe", "true or false"),
])
def test_bad_fix_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fix(text)


def test_plan_command_json(capsys):
    assert main(["plan", "--model", "llama3-8b", "--gpus", "16", "--global-batch-size", "64",
                 "--seq-len", "4096", "--json", "--top", "3", "--fix", "tp=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["candidates"]) == 3
    first = out["candidates"][0]
    assert first["tp"] == 8 and first["fits"]
    for key in ("dp", "tp", "pp", "cp", "zero", "schedule", "virtual_stages", "micro_batch_size",
                "sequence_parallel", "recompute", "offload", "step_time_s", "tokens_per_s", "mfu"):
        assert key in first
    assert set(first["memory_bytes"]) == {"params", "grads", "optimizer", "activations", "other", "total"}


def test_plan_command_table_and_explanation(capsys):
    assert main(["plan", "--model", "llama3-8b", "--gpus", "16", "--global-batch-size", "64", "--explain",
                 "--gpu-hour-price", "2"]) == 0
    out = capsys.readouterr().out
    assert "winner:" in out and "over dp=" in out and "$" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown --model gpt5"),
    (["--model", "tiny", "--arch", "gpt"], "exactly one of"),
    (["--arch", "gpt", "--layers", "4"], "needs --hidden, --heads, --vocab"),
    (["--model", "tiny", "--gpu", "tpu"], "choose one of a100-40gb"),
])
def test_plan_command_errors(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_no_layout_fits_names_the_closest(capsys):
    assert main(["plan", "--model", "llama3-405b", "--gpus", "8", "--global-batch-size", "8"]) == 1
    assert "the closest" in capsys.readouterr().err


@pytest.mark.slow
def test_llama3_70b_on_1024_gpus():
    candidates = plan(PRESETS["llama3-70b"].__class__(**{**PRESETS["llama3-70b"].__dict__, "seq_len": 8192}),
                      make_cluster("h100-80gb", 1024, 8), 1024, Dtypes.for_precision("bf16"))
    assert candidates[0].fits and candidates[0].layout.tp <= 8


def test_llama3_405b_predictions_stay_near_what_meta_reported():
    """benchmarks/planner_vs_published.py: the best layout with Llama 3 405B's published
    degrees predicts TFLOP/s per GPU within a quarter of what was achieved (0.84-1.06 when
    first run); a planner change that drifts further from reality fails here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from planner_vs_published import LLAMA3_405B, predicted

    for gpus, tp, cp, pp, seq_len, reported in LLAMA3_405B:
        ours = predicted(gpus, tp, cp, pp, seq_len)
        assert ours["fits"] and 0.75 <= ours["tflops_per_gpu"] / reported <= 1.25, (gpus, cp, ours)


@pytest.mark.parametrize("pp, gpus, batch, chunks", [(16, 16384, 2048, {2, 4}), (14, 224, 112, {3, 9})])
def test_interleaved_layouts_of_uneven_stages_and_any_chunk_count_are_searched(pp, gpus, batch, chunks):
    """Llama 3 405B's 126 layers, which neither 16 nor 14 stages divide: every chunk
    count that divides the busiest stage's layers (8 and 9) and leaves a layer per chunk
    is a candidate - before, only 2 and 4 were tried, and only where pp x v divided the
    layers: none here."""
    from meshpar.planner.hardware import make_cluster
    from meshpar.planner.search import layouts

    fixed = dict(tp=8, pp=pp, cp=1, schedule="interleaved-1f1b", micro_batch_size=1, zero=1, recompute="none",
                 offload="none", sequence_parallel=True)
    found = list(layouts(PRESETS["llama3-405b"], make_cluster("h100-80gb", gpus, 8), batch, fixed))
    assert {layout.virtual_stages for layout in found} == chunks


def emulated(nodes=2, per_node=4, link_GBps=0.0125, reduce_scatter=2.0):
    """2 hosts x 4 ranks sharing one 100 Mbit/s link each, every other cost zero."""
    from dataclasses import replace as changed

    from meshpar.planner.hardware import Cluster
    base = make_cluster("h100-80gb", nodes * per_node, per_node)
    gpu = changed(base.gpu, inter_node_latency_us=0.0, intra_node_latency_us=0.0)
    eff = changed(base.efficiency, inter_collective=1.0)
    return Cluster(gpu, nodes * per_node, per_node, eff, node_link_GBps=link_GBps,
                   wire_factors=(("reduce_scatter", reduce_scatter),))


@pytest.mark.parametrize("op, per_node_groups, expected", [
    ("all_reduce", 1, 2 * 7 / 8), ("all_gather", 1, 7 / 8), ("reduce_scatter", 1, 2 * 7 / 8),
    ("all_to_all", 1, 4 * 4 / 8), ("hierarchical", 1, 1.0)])
def test_a_collective_across_hosts_takes_the_bytes_leaving_a_host_over_its_link(op, per_node_groups, expected):
    """Over all 8 ranks of 2 hosts: bytes leaving a host per payload byte (a ring edge per
    host; gloo's reduce-scatter measured at an all-reduce's bytes; an all-to-all's 4 ranks
    x 4 remote blocks; the hierarchical all-reduce's 4 shards each across 2 hosts) over
    the link; the intra-node halves of the hierarchical one are on NVLink, nearly free."""
    from meshpar.planner.network import collective_time, node_of
    cluster = emulated()
    seconds = collective_time(cluster, op, 1e6, list(range(8)), node_of(cluster))
    assert seconds == pytest.approx(expected * 1e6 / 0.0125e9, rel=1e-3 if op == "hierarchical" else 1e-9)


def test_groups_sharing_a_link_and_tp_dealt_across_hosts():
    """dp4 x tp2 on 2 hosts x 4: each of the 2 dp groups has 2 ranks per host and one ring
    edge out of it - the link carries both. Dealt round-robin, a tp pair spans the hosts
    and 4 pairs share each link; the dp groups stay inside a host."""
    from meshpar.planner.network import collective_time, node_of
    cluster = emulated()
    dp_ranks = [0, 2, 4, 6]
    consecutive, dealt = node_of(cluster), node_of(cluster, round_robin=True)
    assert collective_time(cluster, "all_reduce", 1e6, dp_ranks, consecutive) == pytest.approx(
        2 * (2 * 3 / 4) * 1e6 / 0.0125e9)
    assert collective_time(cluster, "all_reduce", 1e6, [0, 1], dealt) == pytest.approx(4 * 1e6 / 0.0125e9)
    assert collective_time(cluster, "all_reduce", 1e6, dp_ranks, dealt) < 1e-3  # inside a host, NVLink


def test_the_reduction_settings_change_the_predicted_step_as_their_bytes_do():
    from dataclasses import replace as changed

    from meshpar.planner.step_time import step_time
    spec, cluster = PRESETS["llama3-8b"], emulated()
    dp8 = layout(dp=8, mbs=1)
    times = {name: step_time(spec, changed(dp8, **settings), cluster, 8)["dp"] for name, settings in {
        "flat": {}, "bf16": {"grad_compression": "bf16"}, "hierarchical": {"hierarchical": True},
        "no-overlap": {"overlap": False}}.items()}
    assert times["flat"] / times["bf16"] == pytest.approx(2, rel=0.02)
    assert times["flat"] / times["hierarchical"] == pytest.approx(1.75, rel=0.02)
    assert times["no-overlap"] > times["flat"]
    assert parse_fix("grad_compression=int8,hierarchical=true,overlap=off,tp_across_nodes=1") == {
        "grad_compression": "int8", "hierarchical": True, "overlap": False, "tp_across_nodes": True}


def test_operations_launched_ahead_bound_a_small_models_compute_from_below():
    """Each operation's fixed cost: on a GPU the host launches ahead of the kernels, so a
    model too small to keep the GPU busy takes its operations' time, and a large one
    its arithmetic's; on a CPU the two add."""
    from dataclasses import replace as changed

    from meshpar.planner.hardware import Cluster
    from meshpar.planner.step_time import step_time
    base = make_cluster("h100-80gb", 8, 8)
    counted = dict(op_overhead_us=10.0, ops_per_layer=209, ops_outside_layers=48)

    def compute(name, mbs, **efficiency):
        cluster = Cluster(base.gpu, 8, 8, changed(base.efficiency, **efficiency))
        return step_time(PRESETS[name], layout(dp=8, mbs=mbs), cluster, 8 * mbs)["compute"]
    small_ops = PRESETS["small"].layers * 209 + 48
    assert compute("small", 1) < small_ops * 10e-6 / 10  # arithmetic alone: far below the launches
    assert compute("small", 1, **counted, launched_ahead=True) == pytest.approx(small_ops * 10e-6)
    assert compute("llama3-8b", 4, **counted, launched_ahead=True) == compute("llama3-8b", 4)
    assert compute("small", 1, **counted) == pytest.approx(compute("small", 1) + small_ops * 10e-6)


def test_a_microbenchmark_files_operations_reach_the_efficiency(tmp_path):
    """benchmarks/gpu_microbench.py writes `operations`; a GPU's efficiency takes them,
    launched ahead of the kernels."""
    from meshpar.planner.hardware import DATA, GPUS, Efficiency, _COLLECTIVES, _from_microbenchmark
    data = json.loads((DATA / "h100-microbench-2026-11-26.json").read_text())
    data["operations"] = {"op_overhead_us": 12.5, "ops_per_layer": 209, "ops_outside_layers": 48}
    (tmp_path / "gpu.json").write_text(json.dumps(data))
    eff = Efficiency(**_from_microbenchmark(tmp_path / "gpu.json", GPUS["h100-80gb"].peak_tflops), **_COLLECTIVES)
    assert (eff.op_overhead_us, eff.ops_per_layer, eff.ops_outside_layers, eff.launched_ahead) == (12.5, 209, 48, True)
