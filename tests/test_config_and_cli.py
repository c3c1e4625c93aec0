"""Every user error is caught before any process group starts: exit code 2, all problems
at once, valid choices named, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from meshpar.cli import main
from meshpar.config import Config, ConfigError, load_toml, validate
from reference import fast_config


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["train", "--no-progress", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5'; choose one of tiny, small, llama-1.4b, llama3-8b"),
    (["--dp", "3"], "--dp=3 does not divide --global-batch-size=32; use a dp in 1, 2, 4, 8, 16, 32"),
    (["--dp", "0"], "--dp=0 must be at least 1"),
    (["--tp", "3"], "--tp=3 does not divide num_heads=8; use one of 1, 2, 4, 8"),
    (["--sequence-parallel"], "--sequence-parallel needs --tp above 1"),
    (["--pp", "2", "--schedule", "pipedream"], "unknown schedule 'pipedream'; choose one of naive, gpipe, 1f1b"),
    (["--pp", "4", "--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--micro-batch-size", "16"],
     "interleaved-1f1b needs the micro-batches per step (2) to be a multiple of --pp=4"),
    (["--pp", "4", "--virtual-stages", "2"], "--virtual-stages 2 needs --schedule interleaved-1f1b"),
    (["--pp", "4", "--schedule", "interleaved-1f1b", "--virtual-stages", "4"],
     "16 pipeline stages (pp x virtual stages) but only 8 layers"),
    (["--pp", "2", "--pp-layers", "3,3"], "--pp-layers 3,3 sums to 6, the model has 8 layers"),
    (["--pp", "2", "--pp-layers", "4,2,2"], "--pp-layers has 3 entries for 2 stages"),
    (["--pp", "2", "--pp-layers", "4,x"], "is not a comma-separated list of layer counts"),
    (["--cp", "2", "--seq-len", "50"], "must be divisible by 2 x cp = 4"),
    (["--micro-batch-size", "5"], "--micro-batch-size=5 must divide the per-rank batch 32/1=32"),
    (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
    (["--seq-len", "300"], "--seq-len=300 exceeds the model's max_seq_len=256"),
    (["--steps", "0"], "--steps=0 must be at least 1"),
    (["--lr", "-1"], "--lr=-1.0 must be positive"),
    (["--device", "tpu"], "--device='tpu'; choose cpu or cuda"),
    (["--model", "llama3-70b"], "too large to train on a CPU"),
])
def test_bad_input_exits_2_with_the_reason(capsys, argv, message):
    try:
        code, err = run_cli(capsys, *argv)
    except SystemExit as exit:  # argparse rejects a malformed flag value itself
        code, err = exit.code, capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_empty_and_short_data(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, err = run_cli(capsys, "--data", str(empty))
    assert code == 2 and "the data is empty" in err
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 1000)  # 950 training, 50 validation tokens
    code, err = run_cli(capsys, "--data", str(short), "--seq-len", "64")
    assert code == 2
    assert "--seq-len=64 is longer than" in err and "validation split has 50 tokens" in err


def test_every_problem_is_reported_at_once(capsys):
    code, err = run_cli(capsys, "--model", "nope", "--dp", "3", "--tp", "0", "--steps", "0")
    assert code == 2
    assert err.count("\n  - ") == 4, err


def test_torchrun_world_size_must_match_the_degrees():
    cfg = Config()
    cfg.parallel.dp = 2
    problems = validate(cfg, env={"RANK": "0", "WORLD_SIZE": "4"})
    assert any("torchrun started 4 ranks but dp*tp*pp*cp = 2" in p for p in problems)


def test_toml_config_and_flag_override(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny"\nnum_layers = 2\n[parallel]\ndp = 2\n'
                    '[train]\nsteps = 7\nseq_len = 32\n')
    cfg = load_toml(path)
    assert (cfg.model.resolve().num_layers, cfg.parallel.dp, cfg.train.steps) == (2, 2, 7)
    assert validate(cfg) == []

    path.write_text('[train]\nstepz = 3\n[paralel]\n')
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    assert "unknown key 'stepz' in [train]" in str(err.value)
    assert "unknown table [paralel]" in str(err.value)

    path.write_text('[train]\nsteps = "ten"\n')
    code, err = run_cli(capsys, "--config", str(path))
    assert code == 2 and "train.steps='ten' must be of type int" in err


def test_cli_trains_on_two_local_ranks_and_writes_metrics(tmp_path):
    """The whole front door: spawned ranks, progress, JSON lines with the promised keys."""
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "meshpar", "train", "--dp", "2", "--steps", "3", "--seq-len", "32",
         "--global-batch-size", "8", "--eval-every", "2", "--metrics-file", str(metrics)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "val_loss" in proc.stderr and "summary" in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s"):
        assert key in steps[0]
    assert [r["step"] for r in records if "val_loss" in r and "summary" not in r] == [2, 3]
    summary = records[-1]
    assert summary["summary"] is True and summary["mesh"]["dp"] == 2
    assert summary["comm"]["dp"]["all_reduce"]["bytes"] > 0
    assert len(summary["model_state_bytes_per_rank"]) == 2


def test_bad_input_from_the_shell_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "meshpar", "train", "--dp", "0"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2
    assert "--dp=0 must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_backend_choices_are_checked_before_any_process_starts():
    cfg = fast_config(backend="mpi")
    assert "--backend='mpi'; choose nccl or gloo" in validate(cfg)
    cfg = fast_config(backend="nccl")
    assert "--backend nccl needs --device cuda; on CPUs use gloo" in validate(cfg)
    assert validate(fast_config(backend="gloo", compile=True)) == []


def test_compile_and_backend_flags_reach_the_config():
    from meshpar.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--compile", "--backend", "gloo"]))
    assert cfg.train.compile and cfg.train.backend == "gloo"
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert not cfg.train.compile and cfg.train.backend is None


def test_compile_without_a_cpp_compiler_is_refused_before_starting(monkeypatch):
    import shutil
    cfg = fast_config(compile=True)
    assert validate(cfg) == []
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert any("--compile on CPUs needs a C++ compiler" in p for p in validate(cfg))
