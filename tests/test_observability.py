"""Seeing what a run does: divergence checks (non-finite values, drifted replicas), the
hang watchdog, traces, the dry run, and the env and plot commands."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshpar.cli import main
from meshpar.train.checks import DivergenceError
from reference import fast_config

ROOT = Path(__file__).parent.parent


def trainer_for(cfg):
    from meshpar.train.launch import build_mesh
    from meshpar.train.trainer import Trainer

    return Trainer(cfg, build_mesh(cfg), torch.device("cpu"))


def nan_on_one_rank(cfg, bad_rank: int, bad_step: int) -> str:
    """Train; on `bad_rank` one gradient turns NaN at `bad_step`. Returns the error."""
    trainer = trainer_for(cfg)
    if trainer.mesh.rank == bad_rank:
        param = dict(trainer.model.named_parameters())["layers.1.mlp.w_down.weight"]
        param.register_hook(lambda g: g * float("nan") if trainer.step + 1 == bad_step else g)
    try:
        for _ in range(cfg.train.steps):
            trainer.train_step()
    except DivergenceError as err:
        return str(err)
    finally:
        trainer.mesh.destroy()
    return "no error"


def test_a_nan_gradient_stops_every_rank_naming_step_rank_and_parameter(worlds):
    cfg = fast_config(dp=2, steps=4)
    cfg.parallel.zero = 1
    messages = worlds(2).run(nan_on_one_rank, cfg, 1, 3)
    assert messages[0] == messages[1]
    assert "step 3" in messages[0] and "rank 1" in messages[0] and "layers.1.mlp.w_down.weight" in messages[0]


def drift_on_one_rank(cfg, name: str) -> str:
    trainer = trainer_for(cfg)
    trainer.train_step()
    trainer.check_consistency()  # identical after a real step
    if trainer.mesh.rank == trainer.mesh.world_size - 1:
        with torch.no_grad():
            dict(trainer.model.named_parameters())[name].view(-1)[0] += 1e-7
    try:
        trainer.check_consistency()
    except DivergenceError as err:
        return str(err)
    finally:
        trainer.mesh.destroy()
    return "no error"


@pytest.mark.parametrize("layout, name, axis", [
    ({"dp": 2, "tp": 2}, "layers.0.attention.wq.weight", "dp"),
    ({"tp": 4, "sequence_parallel": True}, "layers.2.attention_norm.weight", "tp"),
])
def test_consistency_check_names_the_drifted_parameter(worlds, layout, name, axis):
    cfg = fast_config(steps=1, **layout)
    messages = worlds(4).run(drift_on_one_rank, cfg, name)
    assert all(m == messages[0] for m in messages)
    assert f"parameter {name} differs across {axis}" in messages[0]


def test_env_command(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch{' ' * 17}{torch.__version__}" in out or torch.__version__ in out
    assert "distributed backends" in out and "topology" in out


def test_plot_command(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    assert main(["train", "--steps", "3", "--global-batch-size", "4", "--seq-len", "32", "--eval-every", "2",
                 "--no-progress", "--metrics-file", str(metrics)]) == 0
    assert main(["plot", str(metrics), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 steps, 2 evaluations" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing.jsonl"), "--out", "x.png"]) == 2


def test_a_stalled_rank_ends_the_run_within_the_timeout_with_a_report():
    timeout = 3.0
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "stall_one_rank.py"), str(timeout)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < timeout + 30, elapsed  # start-up of two processes included
    report = result.stderr
    assert "meshpar watchdog: rank 0 (pp=0, dp=0, cp=0, tp=0)" in report
    assert "in all_reduce over dp (ranks [0, 1]) for 'loss'" in report
    assert report.count("warmup") == 3 and "its last 4 collectives" in report
