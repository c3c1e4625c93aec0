"""Configurations no one listed: hypothesis draws `meshpar train` command lines - degrees,
batch splits, schedules, ZeRO, offload, precision, recomputation, compression, context
parallelism, valid and invalid together - and each must either be refused (exit code 2
and a message, no traceback) or run one step on the ranks it names, never raise and
never hang (a World's timeout fails the example).

The quick suite draws DRAWS command lines with a fixed seed; `-m slow` draws SLOW_DRAWS.
"""

from __future__ import annotations

import math
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshpar.cli import build_parser, config_from_args, main
from meshpar.config import ConfigError, check
from multirank import RankFailure
from reference import train_and_report

DRAWS, SLOW_DRAWS = 24, 2000
MAX_RANKS = 8  # the largest world the suite starts on two cores
STEP_TIMEOUT_S = 180
DRAWS_DIR = tempfile.mkdtemp(prefix="meshpar-draws-")  # the drawn runs' checkpoints; removed at the end

degrees = st.sampled_from([1, 1, 1, 2, 2, 4, 3, 8, 0])


@st.composite
def command_lines(draw) -> list[str]:
    """One `meshpar train` command line of the tiny model, one or two steps."""
    dp, tp, pp, cp = (draw(degrees) for _ in range(4))
    assume(math.prod(d for d in (dp, tp, pp, cp) if d > 0) <= MAX_RANKS)
    argv = ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--cp", str(cp),
            "--global-batch-size", str(draw(st.sampled_from([1, 2, 4, 6, 8, 8, 16, 16, 0]))),
            "--seq-len", str(draw(st.sampled_from([8, 12, 16, 24, 32, 32, 300, 0])))]
    if draw(st.booleans()):
        argv += ["--micro-batch-size", str(draw(st.sampled_from([1, 2, 3, 4, 8])))]
    if pp != 1:
        argv += ["--schedule", draw(st.sampled_from(["naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "async",
                                                     "dualpipe"]))]
        if draw(st.booleans()):
            argv += ["--virtual-stages", str(draw(st.sampled_from([1, 2, 3])))]
        if draw(st.integers(0, 4)) == 0:
            argv += ["--pp-layers", draw(st.sampled_from(["3,5", "4,4", "1,7", "2,2,2,2", "8,0", "x"]))]
    if tp != 1 and draw(st.booleans()):
        argv += ["--sequence-parallel"]
    if cp != 1 and draw(st.booleans()):
        argv += ["--cp-impl", draw(st.sampled_from(["ring", "all-to-all", "star"]))]
    argv += ["--zero", str(draw(st.sampled_from([0, 1, 2, 3, 4])))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--offload", draw(st.sampled_from(["optimizer", "params", "optimizer,params", "gpu"]))]
    argv += ["--precision", draw(st.sampled_from(["fp32", "bf16", "fp16"]))]
    argv += ["--recompute", draw(st.sampled_from(["none", "full", "selective"]))]
    if draw(st.integers(0, 2)) == 0:
        argv += ["--grad-compression", draw(st.sampled_from(["bf16", "fp16", "int8"]))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--ranks-per-node", str(draw(st.sampled_from([1, 2, 4, 3])))]
        if draw(st.booleans()):
            argv += ["--hierarchical-allreduce"]
    if draw(st.integers(0, 4)) == 0:
        argv += ["--no-overlap", "--bucket-mb", str(draw(st.sampled_from([0.01, 1, 0, -1])))]
    if draw(st.integers(0, 5)) == 0:
        argv += ["--recompute-every", str(draw(st.sampled_from([1, 2, 3, 0])))]
    if draw(st.integers(0, 5)) == 0:
        argv += ["--no-error-feedback"]
    if draw(st.integers(0, 5)) == 0:
        argv += ["--check-consistency-every", str(draw(st.sampled_from([1, 0, -1])))]
    if draw(st.integers(0, 5)) == 0:
        argv += ["--lr-scale-from", str(draw(st.sampled_from([8, 0, 3])))]
    if draw(st.integers(0, 5)) == 0:
        argv += ["--loss-scale-initial", str(draw(st.sampled_from([1.0, 2.0 ** 20, 0.0, -1.0])))]
    if draw(st.integers(0, 6)) == 0:
        argv += ["--device", draw(st.sampled_from(["cuda", "mps", "cpu"]))]
    if draw(st.integers(0, 6)) == 0:
        argv += ["--backend", draw(st.sampled_from(["nccl", "gloo", "mpi"]))]
    if draw(st.integers(0, 6)) == 0:
        argv += ["--model", draw(st.sampled_from(["tiny", "llama3-8b", "gpt5"]))]
    steps = draw(st.sampled_from([1, 1, 1, 2, 0]))
    eval_every = draw(st.sampled_from([0, 0, 1]))
    return argv + ["--steps", str(steps), "--warmup-steps", "0", "--eval-every", str(eval_every),
                   "--eval-batches", str(draw(st.sampled_from([1, 2]))), "--no-progress"]


@st.composite
def likely_valid_command_lines(draw) -> list[str]:
    """Command lines that mostly run: powers of two, batches that split, valid choices -
    what remains refused is refused by how the options combine."""
    dp, tp, pp, cp = (draw(st.sampled_from([1, 1, 2, 2, 4])) for _ in range(4))
    assume(dp * tp * pp * cp <= MAX_RANKS)
    argv = ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), "--global-batch-size", "16",
            "--seq-len", str(draw(st.sampled_from([16, 32]))),
            "--micro-batch-size", str(draw(st.sampled_from([1, 2, 4]))),
            "--zero", str(draw(st.sampled_from([0, 1, 2, 3]))),
            "--precision", draw(st.sampled_from(["fp32", "bf16", "fp16"])),
            "--recompute", draw(st.sampled_from(["none", "full", "selective"])),
            "--grad-compression", draw(st.sampled_from(["none", "bf16", "int8"]))]
    if pp > 1:
        argv += ["--schedule", draw(st.sampled_from(["naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1",
                                                     "async"]))]
        argv += ["--virtual-stages", str(draw(st.sampled_from([1, 2])))]
    if tp > 1 and draw(st.booleans()):
        argv += ["--sequence-parallel"]
    if cp > 1:
        argv += ["--cp-impl", draw(st.sampled_from(["ring", "all-to-all"]))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--offload", draw(st.sampled_from(["optimizer", "params", "optimizer,params"]))]
    if dp > 1 and draw(st.integers(0, 3)) == 0:
        argv += ["--ranks-per-node", str(draw(st.sampled_from([2, 4]))), "--hierarchical-allreduce"]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--no-overlap"]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--check-consistency-every", "1"]
    if draw(st.integers(0, 3)) == 0:  # a checkpoint after every step, in this layout
        argv += ["--save-dir", tempfile.mkdtemp(dir=DRAWS_DIR), "--save-every", "1"]
    return argv + ["--steps", str(draw(st.sampled_from([1, 2]))), "--warmup-steps", "0",
                   "--eval-every", str(draw(st.sampled_from([0, 1]))), "--eval-batches", "1", "--no-progress"]


def refused_cleanly(argv: list[str], capsys) -> bool:
    """True when `meshpar train argv` exits 2 with a message and no traceback; False when
    the configuration is valid (raises when it does anything else)."""
    try:
        cfg = check(config_from_args(build_parser().parse_args(["train", *argv])))
    except SystemExit as exit_:  # argparse: a flag's value it cannot read
        assert exit_.code == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, (argv, err)
        return True
    except ConfigError:
        code = main(["train", *argv])
        err = capsys.readouterr().err
        assert code == 2 and "the configuration has problems" in err and "Traceback" not in err, (argv, err)
        return True
    assert cfg.mesh.world_size <= MAX_RANKS, f"valid on {cfg.mesh.world_size} ranks: {argv}"
    return False


def run_one_step(argv: list[str], worlds) -> None:
    cfg = check(config_from_args(build_parser().parse_args(["train", *argv])))
    size = cfg.mesh.world_size
    try:
        results = (worlds(size).run(train_and_report, cfg, timeout_s=STEP_TIMEOUT_S) if size > 1
                   else [train_and_report(cfg)])
    except RankFailure as failure:
        raise AssertionError(f"meshpar train {' '.join(argv)}\nfailed on its ranks:\n{failure}") from None
    losses = [r["losses"] for r in results]
    assert all(len(x) == cfg.run.steps and all(map(math.isfinite, x)) for x in losses), (argv, losses)


def check_command_line(argv, worlds, capsys, tried):
    tried["all"] += 1
    if refused_cleanly(argv, capsys):
        tried["refused"] += 1
        return
    tried["ran"] += 1
    run_one_step(argv, worlds)


@pytest.fixture(scope="module")
def tried():
    counts = {"all": 0, "refused": 0, "ran": 0}
    yield counts
    shutil.rmtree(DRAWS_DIR, ignore_errors=True)
    print(f"\nconfigurations tried: {counts['all']}, refused with exit 2: {counts['refused']}, "
          f"ran one step: {counts['ran']}")


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])


@pytest.mark.timeout(900)  # the whole draw; each step has the World's own timeout
@settings(max_examples=DRAWS, **SETTINGS)
@given(argv=command_lines())
def test_every_command_line_runs_or_is_refused(argv, worlds, capsys, tried):
    check_command_line(argv, worlds, capsys, tried)


@pytest.mark.slow
@pytest.mark.timeout(10800)
@settings(max_examples=SLOW_DRAWS, **{**SETTINGS, "derandomize": False})
@given(argv=command_lines())
def test_many_command_lines_run_or_are_refused(argv, worlds, capsys, tried):
    check_command_line(argv, worlds, capsys, tried)


@pytest.mark.timeout(900)
@settings(max_examples=DRAWS * 2 // 3, **SETTINGS)  # each runs a step: two thirds of the broad draw's count
@given(argv=likely_valid_command_lines())
def test_likely_valid_command_lines_run_or_are_refused(argv, worlds, capsys, tried):
    check_command_line(argv, worlds, capsys, tried)


@pytest.mark.slow
@pytest.mark.timeout(10800)
@settings(max_examples=SLOW_DRAWS // 4, **{**SETTINGS, "derandomize": False})
@given(argv=likely_valid_command_lines())
def test_many_likely_valid_command_lines_run_or_are_refused(argv, worlds, capsys, tried):
    check_command_line(argv, worlds, capsys, tried)
