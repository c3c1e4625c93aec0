"""Every layout composes: dp x tp x pp x cp factorizations of 4 and 8 ranks, with each ZeRO
stage, pipeline schedule and recomputation policy, against the single-device reference
(10 steps, fp32, gradient clipping active on every step). A representative subset runs
by default; the full matrix is marked slow. Also the demo layout's golden losses."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from meshpar.config import validate
from multirank import RankFailure
from reference import fast_config, train_and_report
from test_zero import assert_matches, train_each

STEPS = 10
MAX_GRAD_NORM = 0.05  # below every step's norm: a norm over one shard or stage would clip wrongly
GOLDEN = Path(__file__).parent / "golden" / "demo_losses.json"


def layout_config(dp: int, tp: int, pp: int, cp: int, zero: int = 0, schedule: str = "1f1b",
                  recompute: str = "none", steps: int = STEPS):
    cfg = fast_config(steps=steps, seq_len=64, max_grad_norm=MAX_GRAD_NORM)
    cfg.update(dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, recompute=recompute)
    if pp > 1:
        cfg.pipeline.schedule = schedule
        cfg.pipeline.virtual_stages = 2 if schedule == "interleaved-1f1b" else 1
        per_rank = cfg.data.global_batch_size // dp
        cfg.data.micro_batch_size = max(1, per_rank // (2 * pp))  # about 2 x pp micro-batches
    return cfg


def factorizations(world: int):
    for dp, tp, pp in itertools.product((1, 2, 4, 8), repeat=3):
        if world % (dp * tp * pp) == 0:
            yield dp, tp, pp, world // (dp * tp * pp)


def matrix(world: int):
    """Every legal (dp, tp, pp, cp, zero, schedule, recompute) for `world` ranks."""
    for dp, tp, pp, cp in factorizations(world):
        for zero, schedule, recompute in itertools.product(
                (0, 1, 2, 3), ("1f1b", "interleaved-1f1b", "zb-h1") if pp > 1 else ("1f1b",), ("none", "selective")):
            cfg = layout_config(dp, tp, pp, cp, zero, schedule, recompute)
            if not validate(cfg):
                yield (dp, tp, pp, cp, zero, schedule, recompute)


def label(case) -> str:
    dp, tp, pp, cp, zero, schedule, recompute = case
    return f"dp{dp}-tp{tp}-pp{pp}-cp{cp}-zero{zero}-{schedule}-{recompute}"


@pytest.fixture(scope="module")
def reference():
    ref = train_and_report(layout_config(1, 1, 1, 1))
    assert min(ref["grad_norms"]) > MAX_GRAD_NORM  # clipping acts on every step
    return ref


def run_cases(worlds, reference, world: int, cases: list, timeout_s: float | None = None):
    try:
        results = worlds(world).run(train_each, [layout_config(*case) for case in cases], timeout_s=timeout_s)
    except RankFailure as failure:  # say which layouts were running
        raise RankFailure(f"in one of {', '.join(map(label, cases))}:\n{failure}") from None
    for case, runs in zip(cases, zip(*results)):
        for rank, run in enumerate(runs):
            assert_matches(run, reference, f"{label(case)} rank {rank}")
            torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(reference["grad_norms"]),
                                       rtol=1e-5, atol=0)


REPRESENTATIVE = {
    8: [(1, 2, 2, 2, 3, "zb-h1", "selective"),
        # The last stage holds 7 Ws back: ZeRO-3 must not free a unit on a count of gradients
        # that mixes several micro-batches' I (norm gains) with W (weights); it did, mid-I.
        (1, 1, 8, 1, 3, "zb-h1", "none")],
    4: [(1, 1, 2, 2, 0, "interleaved-1f1b", "selective"),
        (2, 1, 1, 2, 2, "1f1b", "none"),
        (1, 2, 2, 1, 3, "zb-h1", "none")],
}


@pytest.mark.parametrize("world", [4, 8])
def test_representative_layouts(worlds, reference, world):
    run_cases(worlds, reference, world, REPRESENTATIVE[world])


@pytest.mark.slow  # the demo layout's losses are also its golden ones (test_demo_layout_...)
def test_more_layouts_of_8_ranks(worlds, reference):
    run_cases(worlds, reference, 8, [(2, 2, 2, 1, 1, "1f1b", "none"),  # the demo layout
                                     (2, 1, 2, 2, 2, "interleaved-1f1b", "none"),
                                     (2, 2, 1, 2, 3, "1f1b", "selective"),
                                     # dp 1's ZeRO-3 shards of stage 0 hold tp-sharded weights only
                                     (2, 2, 2, 1, 3, "1f1b", "none")])


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # about 20 minutes at 4 ranks and 65 at 8 on 2 idle cores
@pytest.mark.parametrize("world", [4, 8])
def test_full_matrix(worlds, reference, world):
    cases = list(matrix(world))
    for start in range(0, len(cases), 8):  # round trips of 8 runs: about 2 minutes, 30 on a crowded machine
        run_cases(worlds, reference, world, cases[start:start + 8], timeout_s=1800)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tied_embeddings_over_every_pipeline_layout_of_4_ranks(worlds):
    """Tied embeddings wherever pp > 1 on 4 ranks (tp, cp, dp or pp4 beside it; ZeRO 0-3;
    1f1b, interleaved, zb-h1): 48 layouts, each within 1e-5 of one device (3.6e-6 at worst
    when first run, about 4 minutes)."""
    def tied(case):
        cfg = layout_config(*case)
        cfg.model.overrides["tie_embeddings"] = True
        return cfg

    reference = train_and_report(tied((1, 1, 1, 1)))
    cases = [case for case in matrix(4) if case[2] > 1 and case[6] == "none" and not validate(tied(case))]
    assert len(cases) == 48
    for start in range(0, len(cases), 8):
        chunk = cases[start:start + 8]
        results = worlds(4).run(train_each, [tied(case) for case in chunk], timeout_s=1800)
        for case, runs in zip(chunk, zip(*results)):
            for rank, run in enumerate(runs):
                assert_matches(run, reference, f"tied {label(case)} rank {rank}")


def test_matrix_covers_every_factorization():
    for world in (4, 8):
        covered = {case[:4] for case in matrix(world)}
        assert covered == set(factorizations(world)), set(factorizations(world)) - covered


def demo_config(steps: int):
    from meshpar.cli import build_parser, config_from_args
    from meshpar.config import check

    argv = Path(__file__).parent.parent.joinpath("Makefile").read_text().split("meshpar train", 1)[1].split("\n")[0]
    cfg = config_from_args(build_parser().parse_args(["train", *argv.split()]))
    cfg.run.steps, cfg.observe.metrics_file, cfg.run.progress = steps, None, False
    cfg.run.eval_every = 0
    return check(cfg)


# The golden losses are bit-exact on the machine that recorded them; another CPU's matmul
# kernels (AVX2 against AVX-512) round differently from the first step on: 9e-8 relative
# at step 1 between the two seen here. Any change of behaviour moves them far more.
GOLDEN_REL = 1e-5
WHOLE_RUN_REL = 2e-3


def assert_golden(losses: list[float], golden: list[float]):
    assert len(losses) == len(golden)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), rtol=GOLDEN_REL, atol=0)


def test_demo_layout_reproduces_its_golden_losses(worlds):
    """The first steps of `make demo` (warmup: the same learning rates whatever the run's
    length) give the recorded losses."""
    golden = json.loads(GOLDEN.read_text())
    steps = 12
    cfg = demo_config(steps)
    assert cfg.mesh.world_size == 8
    assert_golden(worlds(8).run(train_and_report, cfg)[0]["losses"], golden["losses"][:steps])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_golden_losses_whole_run(worlds):
    golden = json.loads(GOLDEN.read_text())
    cfg = demo_config(len(golden["losses"]))
    losses = worlds(8).run(train_and_report, cfg, timeout_s=600)[0]["losses"]
    # Across CPUs the first steps' round-off (above) grows over training: on an AVX-512
    # machine against the recording one, 8.6e-8 relative at step 1, 1e-6 at step 30,
    # 6.2e-4 at most (step 84). So the first 30 steps are held to GOLDEN_REL and the
    # whole run to WHOLE_RUN_REL; a change of behaviour shows in the first steps.
    assert_golden(losses[:30], golden["losses"][:30])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden["losses"]), rtol=WHOLE_RUN_REL, atol=0)
