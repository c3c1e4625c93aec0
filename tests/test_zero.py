"""ZeRO stages 0-3 over dp against the single-device reference: losses of every step and
final parameters (20 steps, fp32, AdamW), with and without accumulation and offload;
model-state bytes per rank against the ZeRO formulas; the ledger against the analytic
volume; and the overlap of reductions with backward, from the event trace."""

import pytest
import torch

from meshpar.config import validate
from reference import fast_config, train_and_report, trainer_on_this_rank

REL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return train_and_report(fast_config(dp=1))


def zero_config(dp: int, stage: int, micro_batch_size: int | None = None, offload: tuple = (), **parallel):
    cfg = fast_config(dp=dp, micro_batch_size=micro_batch_size)
    cfg.zero.stage, cfg.zero.offload = stage, list(offload)
    for key, value in parallel.items():
        cfg.update(**{key: value})
    return cfg


def train_each(configs: list) -> list[dict]:
    """Several runs in one call on every rank (one round trip to the world)."""
    return [train_and_report(cfg) for cfg in configs]


def assert_matches(run: dict, ref: dict, label: str, rel: float = REL):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=rel, atol=0,
                               msg=lambda m: f"{label}: {m}")
    for name, value in ref["params"].items():
        diff = run["params"][name] - value
        assert diff.norm() <= rel * value.norm(), f"{label} {name}: relative error {diff.norm() / value.norm():.2e}"


def variants(stage: int) -> list[tuple[int | None, tuple]]:
    """(micro_batch_size, offload): with and without accumulation and offload."""
    offloads = [(), ("optimizer",)] + ([("params",)] if stage == 3 else [])
    return [(mbs, off) for mbs in (None, 2) for off in offloads]


def run_matrix(worlds, reference, dp: int, cases: list[tuple[int, int | None, tuple]]):
    configs = [zero_config(dp, stage, mbs, off) for stage, mbs, off in cases]
    results = worlds(dp).run(train_each, configs)
    for (stage, mbs, off), first, last in zip(cases, results[0], results[-1]):
        label = f"dp={dp} zero={stage} micro_batch={mbs} offload={off}"
        assert_matches(first, reference, label)
        assert_matches(last, reference, label + " (last rank)")


@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.slow), 2, 3])  # ZeRO-1: the demo's golden run
def test_zero_equals_single_device_dp2(worlds, reference, stage):
    # by default: plain, and accumulation with offload (the rest of the matrix is slow)
    cases = [(None, ()), (2, ("params",) if stage == 3 else ("optimizer",))]
    run_matrix(worlds, reference, 2, [(stage, mbs, off) for mbs, off in cases])


def test_zero_equals_single_device_dp4_subset(worlds, reference):
    run_matrix(worlds, reference, 4, [(2, 2, ("optimizer",)), (3, None, ())])


@pytest.mark.slow
@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_equals_single_device_full_matrix(worlds, reference, dp, stage):
    run_matrix(worlds, reference, dp, [(stage, mbs, off) for mbs, off in variants(stage)])


def test_zero3_activations_leave_out_the_gathered_weights(worlds):
    """The activation bytes do not depend on the ZeRO stage: the weights a layer saves
    (norm gains) live in a bucket ZeRO-3 gathered just for it, still parameters (it
    counted those buckets once, 0.5-4% more and different on each rank)."""
    configs = [zero_config(2, stage) for stage in (0, 3)]
    for cfg in configs:
        cfg.run.steps = 2
    for zero0, zero3 in worlds(2).run(train_each, configs):
        assert zero3["summary"]["activation_bytes_per_rank"] == zero0["summary"]["activation_bytes_per_rank"]


LAYOUTS = {"tp2_sp": {"tp": 2, "sequence_parallel": True},
           "pp2_1f1b": {"pp": 2, "schedule": "1f1b", "micro_batch_size": 2},
           "pp2_zb": {"pp": 2, "schedule": "zb-h1", "micro_batch_size": 4}}
QUICK_COMPOSITIONS = {("tp2_sp", 3), ("pp2_1f1b", 3), ("pp2_zb", 2)}


@pytest.mark.parametrize("layout, stage", [
    pytest.param(layout, stage, marks=[] if (layout, stage) in QUICK_COMPOSITIONS else [pytest.mark.slow])
    for layout in LAYOUTS for stage in (1, 2, 3)])
def test_zero_composes_with_tp_and_pp(worlds, reference, layout, stage):
    """dp=2 on 4 ranks, each dp slice of tp or pp ranks sharding over its own dp group."""
    settings = dict(LAYOUTS[layout])
    cfg = zero_config(2, stage, settings.pop("micro_batch_size", None), **settings)
    for rank, run in enumerate(worlds(4).run(train_and_report, cfg)):
        assert_matches(run, reference, f"{layout} zero={stage} rank {rank}")


def test_model_state_bytes_follow_the_zero_formulas(worlds):
    n = 4
    configs = [zero_config(n, stage) for stage in range(4)]
    configs += [zero_config(n, 1, offload=("optimizer",)), zero_config(n, 3, offload=("params",))]
    for cfg in configs:
        cfg.run.steps = 2
    results = worlds(n).run(train_each, configs)
    psi = configs[0].model.resolve().num_params()
    fp32 = 4
    # (params, grads, optimizer) on the device, in bytes: fp32 parameters and gradients,
    # AdamW's two fp32 moments; 1/N where the stage shards them.
    expected = {
        0: (fp32 * psi, fp32 * psi, 2 * fp32 * psi),
        1: (fp32 * psi, fp32 * psi, 2 * fp32 * psi / n),
        2: (fp32 * psi, fp32 * psi / n, 2 * fp32 * psi / n),
        3: (fp32 * psi / n, fp32 * psi / n, 2 * fp32 * psi / n),
        "1+offload": (fp32 * psi, fp32 * psi, 0),
        "3+offload params": (0, fp32 * psi / n, 0),
    }
    for key, rank_results in zip(expected, zip(*results)):
        for run in rank_results:
            state = run["summary"]["model_state_bytes_per_rank"][0]
            for kind, value in zip(("params", "grads", "optimizer"), expected[key]):
                # within 2%: each bucket is padded to a multiple of N elements
                assert state[kind] == pytest.approx(value, rel=0.02, abs=0), f"zero {key} {kind}: {state}"
            if "offload" in str(key):  # on the host: this rank's master shard, its gradient, the moments
                host = state["host"]
                assert host["grads"] == pytest.approx(fp32 * psi / n, rel=0.02)
                if key == "3+offload params":  # the shard in host memory is the master itself
                    assert host["params"] == pytest.approx(fp32 * psi / n, rel=0.02)
                    assert host["optimizer"] == pytest.approx(2 * fp32 * psi / n, rel=0.02)
                else:
                    assert host["optimizer"] == pytest.approx(3 * fp32 * psi / n, rel=0.02)


def test_ledger_volume_per_step(worlds):
    n, steps = 4, 3
    configs = [zero_config(n, stage) for stage in range(4)]
    for cfg in configs:
        cfg.run.steps = steps
    results = worlds(n).run(train_each, configs)
    grad_bytes = 4 * configs[0].model.resolve().num_params()
    ring = (n - 1) / n
    # wire bytes per rank and step, ring-equivalent: all-reduce counts 2(N-1)/N, reduce-
    # scatter and all-gather (N-1)/N of the full gradient or parameter bytes
    training_tags = {0: {"grads"}, 1: {"grads", "params_step"}, 2: {"grads", "params_step"},
                     3: {"grads", "params_forward", "params_backward"}}
    for stage, run in enumerate(results[0]):
        wire = sum(entry.wire_bytes for (axis, op, tag), entry in run["ledger"].items()
                   if axis == "dp" and tag in training_tags[stage])
        factor = 3 if stage == 3 else 2
        assert wire / steps == pytest.approx(factor * ring * grad_bytes, rel=1e-3), f"zero {stage}"
        ops = {op for (axis, op, tag), _ in run["ledger"].items() if axis == "dp" and tag in training_tags[stage]}
        assert ops == ({"all_reduce"} if stage == 0 else {"reduce_scatter", "all_gather"})


def zero3_gathers(cfg, sixteen_bit: bool) -> dict:
    """Train cfg (ZeRO-3) with its compute's gathers in 16 bits or, `sixteen_bit` False,
    in fp32; the losses, final parameters, gather wire bytes and the packings."""
    with trainer_on_this_rank(cfg) as trainer:
        dp = trainer.data_parallel
        packings = [(b.numel, dp.gathering.of[b.index].sixteen_bit and dp.gathering.of[b.index].sixteen_bit.width)
                    for b in dp.buckets]
        if not sixteen_bit:
            for g in dp.gathering.of.values():
                g.sixteen_bit = None
        result = trainer.run()
        return {"losses": [s["loss"] for s in result.steps], "params": result.parallel.full_state(),
                "wire": {tag: e.wire_bytes for (axis, op, tag), e in trainer.mesh.ledger.entries.items()
                         if axis == "dp" and tag.startswith("params_")},
                "packings": packings}


@pytest.mark.parametrize("precision, layout", [("bf16", {"dp": 2}), pytest.param(
    "fp16", {"dp": 2, "tp": 2, "sequence_parallel": True}, marks=pytest.mark.slow)])
def test_zero3_gathers_linear_weights_in_16_bits_and_changes_no_bit(worlds, precision, layout):
    cfg = fast_config(steps=4, micro_batch_size=2)
    cfg.zero.stage, cfg.precision.precision = 3, precision
    for key, value in layout.items():
        cfg.update(**{key: value})
    n, world = layout["dp"], cfg.mesh.world_size
    half, full = (worlds(world).run(zero3_gathers, cfg, sixteen)[0] for sixteen in (True, False))
    # Linear layers compute from the 16-bit rounding autocast would have made; the rest exact.
    assert half["losses"] == full["losses"]
    for name, value in full["params"].items():
        assert torch.equal(half["params"][name], value), name
    # Each gather moves n x (shard + 2 x the most exact elements on a rank) 16-bit words;
    # buckets without a linear weight (the embedding, the final norm) move fp32.
    per_gather_half = sum(2 * n * packing if packing else 4 * numel for numel, packing in half["packings"])
    per_gather_full = sum(4 * numel for numel, _ in half["packings"])
    ratio = (n - 1) / n
    for tag in ("params_forward", "params_backward"):
        calls = full["wire"][tag] / (ratio * per_gather_full)
        assert half["wire"][tag] == pytest.approx(calls * ratio * per_gather_half, rel=1e-12), tag
        assert half["wire"][tag] / full["wire"][tag] < 0.53, tag  # the tiny model: half, but for norms and embedding
    layers = [packing for _, packing in half["packings"] if packing]
    assert len(layers) == cfg.model.resolve().num_layers + (0 if cfg.model.resolve().tie_embeddings else 1)


def test_zero3_gathers_a_tied_embedding_for_both_of_its_layers(worlds):
    """The embedding and the output layer share one weight: one bucket, gathered before
    each of the two forwards and once for backward, where it stays until the embedding's
    gradient is in (its two uses' sum); with offload of the parameters too."""
    tied = {"tie_embeddings": True}
    reference = train_and_report(fast_config(model=tied))
    configs = [zero_config(2, 3, mbs, off) for mbs, off in ((None, ()), (2, ("params",)))]
    for cfg in configs:
        cfg.model.overrides.update(tied)
    for run, (mbs, _) in zip(worlds(2).run(train_each, configs)[0], ((None, ()), (2, ("params",)))):
        # Tied, the model amplifies rounding: ZeRO-0 at dp2 ends 1.3e-5 from one device too
        # (1.6e-5 here, where untied layouts stay within 4e-6).
        assert_matches(run, reference, f"tied zero 3 micro_batch={mbs}", rel=3e-5)
        cfg = configs[0].model.resolve()
        steps, m = configs[0].run.steps, 1 if mbs is None else 16 // 2 // mbs
        units = cfg.num_layers + 2  # the layers, the final norm, the embedding-and-output bucket
        gathers = {tag: e.calls for (axis, op, tag), e in run["ledger"].items() if axis == "dp" and op == "all_gather"}
        # forward: every bucket once, the shared one twice; backward: every bucket once (the shared
        # one stays gathered from the output layer's backward to the embedding's)
        assert gathers["params_forward"] == steps * m * (units + 1), gathers
        assert gathers["params_backward"] == steps * m * units, gathers


def gathered_at_each_weight_pass(cfg, early: bool) -> dict:
    """Train cfg (ZeRO-3, zb-h1) with units freed after their input gradient (`early`) or
    once their last gradient is in; the buckets gathered whenever a W starts."""
    with trainer_on_this_rank(cfg) as trainer:
        dp, store = trainer.data_parallel, trainer.pipeline.weight_grads
        assert dp.free_after_input_grad  # what the trainer sets where W is split at the linears
        dp.free_after_input_grad = early
        gathered, weight_pass = [], store.weight_pass
        store.weight_pass = lambda key: (gathered.append(sum(g.gathered for g in dp.gathering.of.values())), weight_pass(key))
        result = trainer.run()
        return {"losses": [s["loss"] for s in result.steps], "params": result.parallel.full_state(),
                "gathered": gathered, "buckets": len(dp.buckets), "microbatches": trainer.num_microbatches,
                "with_split_weights": sum(any(id(p) in store.deferrable for p in b.params) for b in dp.buckets),
                "gathers": {tag: e.calls for (axis, op, tag), e in trainer.mesh.ledger.entries.items()
                            if axis == "dp" and tag.startswith("params_")}}


def test_zero3_frees_a_unit_before_its_weight_pass(worlds):
    """zb-h1's W reads no weight (pipeline/weight_grads.py), so under ZeRO-3 a unit is
    freed once its input gradient is done: no bucket is gathered when a W starts, and
    every bucket is gathered once per micro-batch in forward and once in backward - the
    ZeRO-3 count. Waiting for the last gradient instead kept every unit with a linear
    layer gathered until its W, and a forward in between found it gathered: fewer
    forward gathers, more memory. The same bits either way."""
    cfg = zero_config(2, 3, micro_batch_size=2, pp=2, schedule="zb-h1")
    cfg.run.steps = 3
    runs = zip(*(worlds(4).run(gathered_at_each_weight_pass, cfg, early) for early in (True, False)))
    saved_by_waiting = []
    for rank, (early, late) in enumerate(runs):
        assert early["gathered"] and set(early["gathered"]) == {0}, (rank, early["gathered"])
        assert max(late["gathered"]) == late["with_split_weights"] > 0, (rank, late["gathered"])
        per_step = cfg.run.steps * early["microbatches"] * early["buckets"]
        assert early["gathers"]["params_forward"] == early["gathers"]["params_backward"] == per_step, early
        assert late["gathers"]["params_backward"] == per_step >= late["gathers"]["params_forward"]
        saved_by_waiting.append(per_step - late["gathers"]["params_forward"])
        assert early["losses"] == late["losses"]
        for name, value in late["params"].items():
            assert torch.equal(early["params"][name], value), name
    # Stage 0 runs each W right after its I; stage 1 holds one back, across a forward.
    assert saved_by_waiting[0] == 0 and saved_by_waiting[-1] > 0, saved_by_waiting


def overlap_trace(stage: int, overlap: bool) -> dict:
    with trainer_on_this_rank(zero_config(2, stage, overlap=overlap, bucket_mb=0.05)) as trainer:
        trainer.train_step()
        events = trainer.data_parallel.events
    done = next(t for t, what, _ in events if what == "backward_done")
    launches = [t for t, what, _ in events if what == "launch"]
    return {"buckets": len(trainer.data_parallel.buckets), "launched": len(launches),
            "before_backward_done": sum(t < done for t in launches)}


@pytest.mark.parametrize("stage", [0, 2])
def test_reductions_launch_during_backward(worlds, stage):
    overlapped = worlds(2).run(overlap_trace, stage, True)[0]
    assert overlapped["buckets"] > 3
    # every bucket's reduction started from a backward hook, before backward returned
    assert overlapped["launched"] == overlapped["before_backward_done"] == overlapped["buckets"]
    serial = worlds(2).run(overlap_trace, stage, False)[0]
    assert serial["launched"] == serial["buckets"] and serial["before_backward_done"] == 0


def test_zero_with_fp16_matches_replicated_fp16(worlds):
    configs = [zero_config(2, stage) for stage in (0, 2, 3)]
    for cfg in configs:
        cfg.precision.precision, cfg.run.steps = "fp16", 6
    results = worlds(2).run(train_each, configs)[0]
    for stage, run in zip((2, 3), results[1:]):
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(results[0]["losses"]), rtol=1e-4, atol=0,
                                   msg=lambda m: f"zero {stage}: {m}")


@pytest.mark.parametrize("change, message", [
    ({"zero": 4}, "choose one of 0, 1, 2, 3"),
    ({"offload": ["disk"]}, "choose from optimizer, params"),
    ({"zero": 2, "offload": ["params"]}, "needs --zero 3"),
    ({"zero": 1, "pp": 2, "schedule": "async"}, "--zero 1 with --schedule async"),
])
def test_zero_config_errors_name_the_choices(change, message):
    cfg = fast_config(dp=2)
    for key, value in change.items():
        cfg.update(**{key: value})
    problems = validate(cfg)
    assert any(message in p for p in problems), problems


def reductions_in_flight(cfg) -> int:
    """On this rank: the most launched gradient reductions whose full buffers were alive
    at once, over a short run."""
    from meshpar.parallel.zero.reduction import GradientReduction

    launch, peak = GradientReduction._launch, 0

    def counting(self, b):
        nonlocal peak
        launch(self, b)
        peak = max(peak, sum(self.of[x.index].launched and x.grad_flat is not None for x in self.buckets))
    GradientReduction._launch = counting
    try:
        with trainer_on_this_rank(cfg) as trainer:
            trainer.run()
            assert len(trainer.data_parallel.buckets) > 4
    finally:
        GradientReduction._launch = launch
    return peak


@pytest.mark.parametrize("stage", [2, 3])
def test_at_most_two_gradient_reductions_run_at_once(worlds, stage):
    """Stages 2-3 keep a unit's full gradient buffer until its reduce-scatter is done:
    beyond MAX_IN_FLIGHT (2) the oldest is waited for, so the buffers of every unit do
    not pile up behind a slow reduction."""
    from meshpar.parallel.zero import MAX_IN_FLIGHT

    cfg = fast_config(dp=2, steps=2)
    cfg.zero.stage, cfg.reduce.bucket_mb = stage, 0.01  # stage 2: many small buckets
    assert MAX_IN_FLIGHT == 2
    assert max(worlds(2).run(reductions_in_flight, cfg)) <= MAX_IN_FLIGHT
