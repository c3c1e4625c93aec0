"""Every user error is caught before any process group starts: exit code 2, all problems
at once, valid choices named, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
    (["--pp", "2", "--schedule", "pipedream"], "--schedule 'pipedream': choose one of naive, gpipe, 1f1b"),
    (["--pp", "4", "--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--micro-batch-size", "16"],
     "interleaved-1f1b needs the micro-batches per step (2) to be a multiple of --pp=4"),
    (["--pp", "4", "--virtual-stages", "2"], "--virtual-stages 2 needs --schedule interleaved-1f1b"),
    (["--pp", "2", "--schedule", "async", "--virtual-stages", "2", "--micro-batch-size", "1"],
     "--virtual-stages 2 needs --schedule interleaved-1f1b (async runs one stage per rank)"),  # it ran, wrongly
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
    (["--device", "tpu"], "--device 'tpu': choose one of cpu, cuda"),
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
    cfg.mesh.dp = 2
    problems = validate(cfg, env={"RANK": "0", "WORLD_SIZE": "4"})
    assert any("torchrun started 4 ranks but dp*tp*pp*cp = 2" in p for p in problems)


def test_toml_config_and_flag_override(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny"\nnum_layers = 2\n[mesh]\ndp = 2\n[zero]\nstage = 1\n'
                    '[run]\nsteps = 7\n[data]\nseq_len = 32\n')
    cfg = load_toml(path)
    assert (cfg.model.resolve().num_layers, cfg.mesh.dp, cfg.zero.stage, cfg.run.steps) == (2, 2, 1, 7)
    assert validate(cfg) == []

    path.write_text('[run]\nstepz = 3\n[paralel]\n[parallel]\nzero = 1\n')
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    assert "unknown key 'stepz' in [run]; valid keys: steps, seed" in str(err.value)
    assert "unknown table [paralel]" in str(err.value)
    assert "unknown table [parallel]" in str(err.value) and "(zero is now [zero] stage)" in str(err.value)

    path.write_text('[run]\nsteps = "ten"\n')
    code, err = run_cli(capsys, "--config", str(path))
    assert code == 2 and "run.steps='ten' must be of type int" in err


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
    assert "--backend 'mpi': choose one of nccl, gloo" in validate(cfg)
    cfg = fast_config(backend="nccl")
    assert "--backend nccl needs --device cuda; on CPUs use gloo" in validate(cfg)
    assert validate(fast_config(backend="gloo", compile=True)) == []


def test_compile_and_backend_flags_reach_the_config():
    from meshpar.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--compile", "--backend", "gloo"]))
    assert cfg.compile.compile and cfg.run.backend == "gloo"
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert not cfg.compile.compile and cfg.run.backend is None


def test_compile_without_a_cpp_compiler_is_refused_before_starting(monkeypatch):
    import shutil
    cfg = fast_config(compile=True)
    assert validate(cfg) == []
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert any("--compile on CPUs needs a C++ compiler" in p for p in validate(cfg))


def test_every_option_is_written_once_and_the_parser_agrees():
    """Flags, help, defaults, valid values and TOML keys all come from the options'
    dataclasses: the parser offers exactly those flags, each with its option's help, and
    leaves the default to the dataclass."""
    import argparse

    from meshpar.cli import build_parser
    from meshpar.config import SECTIONS, all_options

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    options = all_options()
    assert len({o.flag for o in options}) == len(options) and len({o.keyword for o in options}) == len(options)
    offered = {flag for a in train._actions for flag in a.option_strings}
    expected = {o.flag for o in options} | {"--no-" + o.flag[2:] for o in options if o.is_bool}
    assert offered == expected | {"-h", "--help", "--model", "--config"}
    defaults = Config()
    for o in options:
        action = actions[o.keyword]
        assert o.flag in action.option_strings and action.default is None, o.flag
        assert len(o.help) > 10 and o.help.replace("%", "%%") in action.help, o.flag
        assert isinstance(action, argparse.BooleanOptionalAction) == o.is_bool, o.flag
        assert getattr(getattr(defaults, o.section), o.name) == o.default, o.flag
        assert o.type_problem(o.default) == [] and o.value_problems(o.default) == [], o.flag
        for value in o.valid_values() or ():
            assert o.value_problems(value) == [], (o.flag, value)
        if o.valid_values():
            assert o.value_problems("nonsense") == [
                f"{o.flag} 'nonsense': choose one of {', '.join(map(str, o.valid_values()))}"]
    for name, cls in SECTIONS.items():
        assert cls.__doc__ and getattr(defaults, name).__class__ is cls


def test_every_option_is_a_toml_key_of_its_section(tmp_path):
    """The TOML tables are the sections and their keys the fields: a file setting every
    option (to a value of its type other than the default) loads into those values."""
    import typing

    from meshpar.config import all_options, load_toml

    def other(o):
        valid = o.valid_values()
        if valid:
            return next(v for v in valid if v != o.default)
        if o.is_bool:
            return not o.default
        kind = next(m for m in typing.get_args(o.hint) or (o.hint,) if m is not type(None))
        return {int: 7, float: 0.25, str: "x", list[int]: [3, 5], list[str]: ["optimizer"]}[kind]

    def toml(value):
        return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')

    lines = []
    for section in dict.fromkeys(o.section for o in all_options()):
        lines.append(f"[{section}]")
        lines += [f"{o.name} = {toml(other(o))}" for o in all_options() if o.section == section]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_toml(path)
    for o in all_options():
        assert getattr(getattr(cfg, o.section), o.name) == other(o), o.name


@pytest.mark.parametrize("options", [
    {"zero": 5}, {"offload": ["params"]}, {"zero": 3, "grad_compression": "int8"},
    {"grad_compression": "int8", "precision": "fp16"}, {"hierarchical_allreduce": True, "zero": 1},
    {"schedule": "async", "zero": 1}, {"schedule": "async", "precision": "fp16", "recompute": "full"},
    {"virtual_stages": 2}, {"schedule": "interleaved-1f1b", "virtual_stages": 2, "micro_batch_size": 2},
    {"recompute_every": 2}, {"precision": "fp8"}, {"cp_impl": "ulysses"}, {"bucket_mb": 0},
    {"loss_scale_backoff": 2.0}, {"beta2": 1.0}, {"lr": "fast"},
])
def test_the_api_refuses_what_the_command_line_refuses_in_the_same_words(options):
    import meshpar
    from meshpar.config import API_SECTIONS
    from meshpar.mesh import MeshShape

    cfg = fast_config(dp=2).update(pp=2, global_batch_size=12, **options)
    problems = validate(cfg, sections=API_SECTIONS)
    assert problems
    microbatches = cfg.microbatches() or 1
    api_options = {k: v for k, v in options.items() if k != "micro_batch_size"}
    with pytest.raises(ValueError) as err:
        meshpar.parallelize(torch.nn.Linear(2, 2), meshpar.ParallelMesh(MeshShape(pp=2, dp=2), 0), meshpar.Plan(),
                            microbatches=microbatches, steps=10, **api_options)
    assert str(err.value) == "; ".join(problems)
    # and the command line says so too, with exit code 2, among its other checks
    assert all(p in validate(cfg) for p in problems)
