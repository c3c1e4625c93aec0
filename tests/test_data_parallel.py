"""Data parallelism against the single-device reference (loss of every step, gradient
norms and final parameters), and the ledger against the analytic all-reduce volume."""

import weakref

import pytest
import torch

from reference import fast_config, train_and_report, trainer_on_this_rank

REL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return train_and_report(fast_config(dp=1))


def assert_matches(run: dict, ref: dict):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=REL, atol=0)
    torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(ref["grad_norms"]),
                               rtol=REL, atol=0)
    # Parameters: Adam turns a gradient's last-bit rounding difference into an update
    # difference of the same relative size, so compare tensors by norm, and bound every
    # element absolutely (they are O(0.02)): ||p - p_ref|| <= 1e-5 ||p_ref||, |p - p_ref| <= 1e-5.
    for name, value in ref["params"].items():
        diff = run["params"][name] - value
        assert diff.norm() <= REL * value.norm(), f"{name}: relative error {diff.norm() / value.norm():.2e}"
        assert diff.abs().max() <= REL, f"{name}: max abs error {diff.abs().max():.2e}"


def test_reference_learns(reference):
    # 20 steps from the uniform-byte loss ln(256) = 5.55: a broken model stays near it.
    assert reference["losses"][0] == pytest.approx(5.55, abs=0.1)
    assert reference["losses"][-1] < 4.3


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_dp_equals_single_device(worlds, reference, dp):
    runs = worlds(dp).run(train_and_report, fast_config(dp=dp))
    for run in runs:
        assert_matches(run, reference)


def test_accumulation_equals_single_device(reference):
    # One rank, 4 micro-batches of 4 sequences instead of one of 16.
    assert_matches(train_and_report(fast_config(dp=1, micro_batch_size=4)), reference)


def test_dp_with_accumulation_equals_single_device(worlds, reference):
    runs = worlds(2).run(train_and_report, fast_config(dp=2, micro_batch_size=2))
    assert_matches(runs[0], reference)


def test_ledger_counts_the_gradient_all_reduce(worlds):
    steps, bucket_mb = 3, 0.25
    cfg = fast_config(dp=4, steps=steps)
    cfg.reduce.bucket_mb = bucket_mb
    runs = worlds(4).run(train_and_report, cfg)
    num_params = cfg.model.resolve().num_params()
    grad_bytes = 4 * num_params  # fp32 gradients, reduced once per step
    # Buckets close at the first parameter that brings them to bucket_mb.
    for run in runs:
        grads = run["ledger"][("dp", "all_reduce", "grads")]
        assert grads.bytes == steps * grad_bytes
        assert grads.wire_bytes == pytest.approx(steps * grad_bytes * 2 * 3 / 4)
        assert grads.calls == steps * run_buckets(cfg)
        # one fp32 loss per step and one at the final evaluation; nothing else on dp
        assert run["ledger"][("dp", "all_reduce", "loss")].bytes == steps * 4
        assert {key for key in run["ledger"] if key[0] == "dp"} == {
            ("dp", "all_reduce", "grads"), ("dp", "all_reduce", "loss"), ("dp", "all_reduce", "eval")}


def run_buckets(cfg) -> int:
    """Bucket count, from the units' (embedding, layers, norm, output) sizes in backward order."""
    from meshpar.model import build_model
    from meshpar.parallel.zero import units_of

    limit = cfg.reduce.bucket_mb * 2**20
    count, filled = 0, 0
    for unit in reversed(units_of(build_model(cfg.model.resolve(), 0))):
        filled += sum(p.numel() for p in unit.parameters()) * 4
        if filled >= limit:
            count, filled = count + 1, 0
    return count + (filled > 0)


def test_summary_reports_every_rank(worlds):
    runs = worlds(2).run(train_and_report, fast_config(dp=2, steps=2))
    summary = runs[0]["summary"]
    assert len(summary["model_state_bytes_per_rank"]) == 2
    num_params = fast_config().model.resolve().num_params()
    for state in summary["model_state_bytes_per_rank"]:
        # fp32 parameters, gradients and AdamW's two moments: 16 bytes per parameter
        assert state == {"params": 4 * num_params, "grads": 4 * num_params,
                         "optimizer": 8 * num_params, "total": 16 * num_params,
                         "host": {"params": 0, "grads": 0, "optimizer": 0, "total": 0}}
    assert summary["comm"]["dp"]["all_reduce"]["bytes"] == runs[1]["summary"]["comm"]["dp"]["all_reduce"]["bytes"]


def test_one_rank_keeps_autograd_gradients_and_equals_the_buckets(reference):
    # Nothing to reduce on one rank: no bucket copy, no gradient buffer through the forward.
    # ZeRO-1 on one rank keeps the buckets (its gradients are the bucket's slots).
    cfg = fast_config(dp=1)
    cfg.zero.stage = 1
    bucketed = train_and_report(cfg)
    assert bucketed["losses"] == reference["losses"]
    for name, value in reference["params"].items():
        torch.testing.assert_close(bucketed["params"][name], value, rtol=0, atol=1e-7)
    with trainer_on_this_rank(fast_config(dp=1, steps=1)) as trainer:
        trainer.run()
        dp = trainer.data_parallel
    assert dp.direct and all(b.grad_flat is None for b in dp.buckets)
    params = dp.params()
    # Each gradient its own storage (a bucket's slots share one), and counted as state.
    assert len({p.grad.untyped_storage().data_ptr() for p in params}) == len(params)
    assert dp.state_bytes(trainer.optimizer)["grads"] == 4 * sum(p.numel() for p in params)
    # Nothing keeps a gradient alive into the next forward (an optimizer piece's view would).
    alive = [weakref.ref(p.grad) for p in params]
    dp.zero_grad()
    assert all(p.grad is None for p in params) and all(ref() is None for ref in alive)


def gradients_held(cfg) -> dict:
    """One step of cfg; how this rank holds its gradients."""
    with trainer_on_this_rank(cfg) as trainer:
        trainer.train_step()
        dp = trainer.data_parallel
        params = dp.params()
        return {"direct": dp.direct, "buffers": sum(b.grad_flat is not None for b in dp.buckets),
                "storages": len({p.grad.untyped_storage().data_ptr() for p in params}), "params": len(params)}


def test_tensor_parallel_alone_keeps_autograd_gradients(worlds):
    # dp = cp = 1: nothing to reduce but tp's partial sums (SP norms), taken after backward.
    # That these runs equal one device is tests/test_tensor_parallel.py's business.
    for held in worlds(2).run(gradients_held, fast_config(tp=2, sequence_parallel=True, steps=1)):
        assert held["direct"] and held["buffers"] == 0 and held["storages"] == held["params"]
    for held in worlds(2).run(gradients_held, fast_config(dp=2, steps=1)):
        assert not held["direct"] and held["buffers"] > 0
