"""Mixed precision: bf16 tracks fp32; fp16's loss scaler skips an overflowing step on
every rank, lowers the scale and leaves the parameters untouched."""

import math

import pytest
import torch

from meshpar.mesh import ParallelMesh
from meshpar.parallel.precision import DynamicLossScaler, LossScaleConfig
from meshpar.train.launch import mesh_shape
from meshpar.train.trainer import Trainer
from reference import fast_config, train_and_report


def test_bf16_tracks_fp32():
    fp32 = train_and_report(fast_config(steps=20))
    bf16 = train_and_report(fast_config(steps=20, precision="bf16"))
    assert bf16["losses"][-1] == pytest.approx(fp32["losses"][-1], rel=0.02)
    assert bf16["losses"] != fp32["losses"]  # it did compute in 16 bits
    for value in bf16["params"].values():
        assert value.dtype == torch.float32  # master weights stay fp32


def test_scaler_hysteresis_backoff_and_growth():
    scaler = DynamicLossScaler(LossScaleConfig(initial_scale=1024, hysteresis=2, growth_interval=3))
    scaler.update(overflow=True)
    assert scaler.scale == 1024  # one overflow is tolerated
    scaler.update(overflow=True)
    assert scaler.scale == 512  # the second in a row halves it
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 1024  # three clean steps double it


def overflow_on_one_rank(cfg, bad_step: int, bad_rank: int):
    """Train; before step `bad_step` rank `bad_rank` turns one gradient into Inf."""
    mesh = ParallelMesh.build(mesh_shape(cfg))
    trainer = Trainer(cfg, mesh, torch.device("cpu"))
    records, before, after = [], None, None
    for step in range(1, cfg.train.steps + 1):
        handle = None
        if step == bad_step:
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            if mesh.rank == bad_rank:
                handle = trainer.model.layers[2].mlp.w_up.weight.register_hook(lambda g: g * math.inf)
        records.append(trainer.train_step())
        if handle:
            handle.remove()
        if step == bad_step:
            after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    untouched = all(torch.equal(before[n], after[n]) for n in before)
    states_finite = all(torch.isfinite(t).all() for s in trainer.optimizer.state.values()
                        for t in s.values() if torch.is_tensor(t))
    return records, untouched, finite and states_finite


def test_fp16_overflow_skips_the_step_on_every_rank(worlds):
    cfg = fast_config(dp=2, steps=5, precision="fp16", loss_scale_hysteresis=1, loss_scale_initial=1024.0)
    for rank, (records, untouched, finite) in enumerate(worlds(2).run(overflow_on_one_rank, cfg, 3, 1)):
        assert [r["skipped"] for r in records] == [False, False, True, False, False], rank
        assert [r["loss_scale"] for r in records] == [1024.0, 1024.0, 1024.0, 512.0, 512.0], rank
        assert records[2]["grad_norm"] is None
        assert untouched, f"rank {rank}: the skipped step changed the parameters"
        assert finite, f"rank {rank}: a NaN or Inf reached the parameters or optimizer states"
        assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_200_steps_bf16_and_fp16():
    """The issue's criterion, on the default batch (32 x 128), on the validation loss (the
    same 4 held-out batches for all). After the warm-up, at this model's peak learning
    rate, a run's final loss moves by a few percent under any perturbation - another
    seed, int8 gradients, bf16 rounding - so one seed's gap measures that chaos, not a
    bias (per seed, bf16 ended 3.1% below to 1.1% above fp32). bf16 is held to fp32 on the
    mean over seeds 0-4; fp16 to bf16 on seed 0. 57 minutes here beside a CI run."""
    def run(precision, seed):
        cfg = fast_config(steps=200, precision=precision, global_batch_size=32, seq_len=128,
                          warmup_steps=20, eval_batches=4, seed=seed)
        return train_and_report(cfg)["val_loss"]
    seeds = range(5)
    fp32, bf16 = ([run(p, s) for s in seeds] for p in ("fp32", "bf16"))
    fp16 = run("fp16", 0)
    print(f"validation loss after 200 steps, seeds 0-4: fp32 {fp32}, bf16 {bf16}; fp16 seed 0 {fp16:.4f}")
    assert sum(bf16) / len(bf16) == pytest.approx(sum(fp32) / len(fp32), rel=0.02)
    assert fp16 == pytest.approx(bf16[0], rel=0.02)


@pytest.mark.parametrize("precision, layout", [
    ("bf16", {"pp": 2}),
    ("fp16", {"tp": 2, "sequence_parallel": True}),
    pytest.param("fp16", {"pp": 2}, marks=pytest.mark.slow),
    pytest.param("bf16", {"tp": 2, "sequence_parallel": True}, marks=pytest.mark.slow),
])
def test_16_bit_compute_with_tp_and_pp(worlds, precision, layout):
    """The same 16-bit run, split: PP passes fp32 hidden states (the residual stream stays
    fp32 under autocast) and matches closely - not exactly, as the ranks run one thread
    and the reference two, and 16-bit kernels round differently per blocking; TP sums
    partial products in 16 bits and matches to 16-bit rounding."""
    def config(**parallel):
        cfg = fast_config(steps=5, precision=precision, micro_batch_size=4,
                          tp=parallel.get("tp", 1), sequence_parallel=parallel.get("sequence_parallel", False))
        cfg.parallel.pp = parallel.get("pp", 1)
        return cfg

    reference = train_and_report(config())
    tolerance = 1e-4 if "pp" in layout else 5e-3
    for run in worlds(2).run(train_and_report, config(**layout)):
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]),
                                   rtol=tolerance, atol=0)
        assert run["summary"].get("skipped_steps", 0) == 0
