"""Seeing what a run does: divergence checks (non-finite values, drifted replicas), the
hang watchdog, traces, the dry run, and the env and plot commands."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshpar.cli import main
from meshpar.parallel.sharding import model_names
from meshpar.train.checks import DivergenceError
from reference import fast_config, trainer_on_this_rank

ROOT = Path(__file__).parent.parent


def nan_on_one_rank(cfg, bad_rank: int, bad_step: int) -> str:
    """Train; on `bad_rank` one gradient turns NaN at `bad_step`. Returns the error."""
    with trainer_on_this_rank(cfg) as trainer:
        if trainer.mesh.rank == bad_rank:
            param = dict(trainer.model.named_parameters())["layers.1.mlp.w_down.weight"]
            param.register_hook(lambda g: g * float("nan") if trainer.step + 1 == bad_step else g)
        try:
            for _ in range(cfg.run.steps):
                trainer.train_step()
        except DivergenceError as err:
            return str(err)
    return "no error"


def test_a_nan_gradient_stops_every_rank_naming_step_rank_and_parameter(worlds):
    cfg = fast_config(dp=2, steps=4)
    cfg.zero.stage = 1
    messages = worlds(2).run(nan_on_one_rank, cfg, 1, 3)
    assert messages[0] == messages[1]
    assert "step 3" in messages[0] and "rank 1" in messages[0] and "layers.1.mlp.w_down.weight" in messages[0]


def test_a_nan_gradient_under_tp_alone_is_named_too(worlds):
    """tp 2, dp 1: the gradients stay autograd's (no buckets); the origin is still named."""
    messages = worlds(2).run(nan_on_one_rank, fast_config(tp=2, steps=4), 1, 3)
    assert messages[0] == messages[1]
    assert "step 3" in messages[0] and "rank 1" in messages[0] and "layers.1.mlp.w_down.weight" in messages[0]


def test_a_nan_gradient_on_one_rank_alone_is_named_too():
    """No reduction, so no per-bucket finite flag: the origin is read from the gradients."""
    message = nan_on_one_rank(fast_config(steps=4), 0, 2)
    assert "step 2" in message and "rank 0" in message and "layers.1.mlp.w_down.weight" in message


def nan_made_in_a_module(cfg, rank: int, module: str, phase: str) -> str:
    """Train; at step 2, on `rank`, `module` makes a NaN: in its forward output (a weight
    element turned NaN, so a tp layer's partial sum carries it on that rank alone), or in
    its backward (the gradient reaching it turned NaN, so its input gradient is). Returns
    the error."""
    with trainer_on_this_rank(cfg) as trainer:
        trainer.train_step()
        if trainer.mesh.rank == rank:
            layer = trainer.model.get_submodule(module)
            if phase == "forward":
                with torch.no_grad():
                    layer.weight.view(-1)[0] = float("nan")
            else:
                def poison_the_gradient_arriving(module, inputs, output):
                    output.register_hook(lambda grad: grad * float("nan"))
                layer.register_forward_hook(poison_the_gradient_arriving)
        try:
            trainer.train_step()
        except DivergenceError as err:
            return str(err)
    return "no error"


@pytest.mark.parametrize("layout, rank, module, phase, origin", [
    (dict(pp=2), 1, "norm", "forward", "the forward of norm on rank 1"),
    (dict(pp=2), 1, "layers.5.mlp.w_down", "backward", "the backward of layers.5.mlp.w_down on rank 1"),
    (dict(tp=2), 1, "layers.3.mlp.w_gate", "forward", "the forward of layers.3.mlp.w_gate on rank 1"),
    pytest.param(dict(pp=2, tp=2, zero=1, dp=2), 6, "layers.6.attention.wq", "forward",
                 "the forward of layers.6.attention.wq on rank 6", marks=pytest.mark.slow),  # 11 s
], ids=["last-stage-forward", "middle-layer-backward", "one-tp-rank", "pp2-dp2-tp2"])
def test_a_nan_is_traced_to_the_module_and_rank_that_made_it(worlds, layout, rank, module, phase, origin):
    """A NaN made in the last stage's forward reaches every stage's gradients (the lowest
    rank with a bad gradient is stage 0's, which was blamed before); one made in a middle
    layer's backward, in the later stage, reaches the earlier stage too; one made by one
    tp rank's shard of a layer is summed into both ranks' outputs. Each is named where
    it appeared, the same on every rank."""
    cfg = fast_config(steps=2, **layout)
    messages = worlds(cfg.mesh.world_size).run(nan_made_in_a_module, cfg, rank, module, phase)
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith("step 2: loss ") and origin in messages[0], messages[0]


SHARD = "the first ZeRO-3 shard"


def drift_on_one_rank(cfg, where: str | None) -> str:
    """A step, a check; then on the last rank one value changed a little - of the parameter
    named `where` (the model's names, a tied copy's too), or of this rank's first ZeRO-3
    shard (`SHARD`: ZeRO-3 releases the parameters' storage between steps, so the check
    gathers them; it read released memory and crashed the rank before), or none - and the
    check again: its error, or "no error"."""
    with trainer_on_this_rank(cfg) as trainer:
        trainer.train_step()
        trainer.check_consistency()  # identical after a real step
        if where is not None and trainer.mesh.rank == trainer.mesh.world_size - 1:
            with torch.no_grad():
                if where == SHARD:
                    trainer.data_parallel.buckets[0].param_shard[0] += 1e-3
                else:
                    dict(model_names(trainer.model))[where].view(-1)[0] += 1e-7
        try:
            trainer.check_consistency()
        except DivergenceError as err:
            return str(err)
    return "no error"


@pytest.mark.parametrize("layout, name, axis", [
    ({"dp": 2, "tp": 2}, "layers.0.attention.wq.weight", "dp"),
    ({"tp": 4, "sequence_parallel": True}, "layers.2.attention_norm.weight", "tp"),
    ({"pp": 4, "model": {"tie_embeddings": True}}, "embedding.weight", "pp_ends"),  # the last stage's copy
])
def test_consistency_check_names_the_drifted_parameter(worlds, layout, name, axis):
    layout = dict(layout)
    pp = layout.pop("pp", 1)
    cfg = fast_config(steps=1, **layout)
    cfg.mesh.pp = pp
    if pp > 1:
        cfg.data.micro_batch_size = 4
    messages = worlds(4).run(drift_on_one_rank, cfg, name)
    assert all(m == messages[0] for m in messages)
    assert f"parameter {name} differs across {axis}" in messages[0]


@pytest.mark.parametrize("layout, where, expected", [
    ({"cp": 2}, SHARD, "differs across cp"),  # dp 1: the shard is every parameter, each replicated over cp
    ({"tp": 2, "dp": 2, "sequence_parallel": True}, None, "no error"),  # the norm gains compared over tp
])
def test_consistency_check_under_zero3_gathers_the_parameters(worlds, layout, where, expected):
    cfg = fast_config(steps=1, zero=3, **layout)
    messages = worlds(cfg.mesh.world_size).run(drift_on_one_rank, cfg, where)
    assert all(m == messages[0] for m in messages)
    assert expected in messages[0], messages[0]


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


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_files_figures_and_a_resume_replaces_the_lost_steps(tmp_path):
    pytest.importorskip("tensorboard")
    board, metrics = tmp_path / "tb", tmp_path / "m.jsonl"
    common = ["train", "--steps", "4", "--global-batch-size", "4", "--seq-len", "32", "--eval-every", "2",
              "--no-progress", "--metrics-file", str(metrics), "--tensorboard", str(board)]
    assert main(common) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r and not r.get("summary")]
    scalars = tensorboard_scalars(board)
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert [(step, pytest.approx(value)) for step, value in scalars[tag]] == \
            [(r["step"], pytest.approx(r[key])) for r in steps], tag
    assert [step for step, _ in scalars["val/loss"]] == [2, 4]
    # A run whose last checkpoint was lost (killed after writing step 4's events): resumed
    # from step 2, its steps 3-4 replace the first run's instead of following them.
    shutil.rmtree(board)
    checkpoints = tmp_path / "ck"
    assert main(common + ["--save-dir", str(checkpoints), "--save-every", "2"]) == 0
    shutil.rmtree(checkpoints / "step-00000004")
    assert main(common + ["--save-dir", str(checkpoints), "--resume"]) == 0
    assert [step for step, _ in tensorboard_scalars(board)["train/loss"]] == [1, 2, 3, 4]


def test_tensorboard_without_the_package_is_refused_before_training(monkeypatch, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    assert main(["train", "--steps", "1", "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("where, waiting", [
    ("collective", "in all_reduce over dp (ranks [0, 1]) for 'loss'"),
    ("ring", "in send_recv over cp (ranks [0, 1]) for 'ring_kv'"),  # unmarked before: no report, 133 s
    ("pp_send", "in send over pp (ranks [0, 1]) for 'activations'"),
])
def test_a_stalled_rank_ends_the_run_within_the_timeout_with_a_report(where, waiting):
    """Rank 1 stalls; rank 0 waits on it in a collective, in ring attention's exchange,
    or on the pipeline's sends: every wait is marked, so the watchdog names it."""
    timeout = 3.0
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "stall_one_rank.py"), str(timeout), where],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < timeout + 30, elapsed  # start-up of two processes included
    report = result.stderr
    assert "meshpar watchdog: rank 0 (pp=0, dp=0, cp=0, tp=0)" in report
    assert waiting in report
    assert report.count("warmup") == 3 and "its last 4 collectives" in report


def test_trace_and_time_split(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    assert main(["train", "--dp", "2", "--pp", "2", "--micro-batch-size", "4", "--steps", "5",
                 "--global-batch-size", "16", "--seq-len", "32", "--eval-every", "0", "--no-progress",
                 "--metrics-file", str(metrics), "--trace", str(tmp_path / "trace")]) == 0
    for rank in range(4):
        events = json.loads((tmp_path / "trace" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        stage = rank // 2
        assert f"F stage {stage} micro-batch 0" in names and f"B stage {stage} micro-batch 1" in names
        assert "gradient reduction dp grads" in names
        assert "recv pp activations" in names  # stage 1 receives activations, stage 0 their gradients
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step = next(r for r in records if "step_time_s" in r)
    assert step["compute_s"] + step["comm_s"] + step["bubble_s"] == pytest.approx(step["step_time_s"], rel=1e-6)
    assert step["memory_bytes"] > 0 and "mfu" not in step  # no MFU on a CPU: its peak is unknown
    summary = records[-1]
    assert len(summary["time_split_per_rank_s"]) == 4
    assert summary["time_split_per_rank_s"][3]["bubble_s"] > 0  # the last stage waits for activations


def test_dry_run_of_a_large_layout(capsys):
    start = time.monotonic()
    assert main(["train", "--model", "llama3-70b", "--tp", "8", "--pp", "4", "--dp", "2", "--dry-run",
                 "--micro-batch-size", "4", "--seq-len", "4096", "--precision", "bf16", "--zero", "1"]) == 0
    out = capsys.readouterr().out
    assert time.monotonic() - start < 60
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert sum(int(r[2]) for r in rows) == 80  # every layer on some stage
    from meshpar.model import model_config
    per_slice = sum(int(r[3].replace(",", "")) for r in rows)
    cfg = model_config("llama3-70b")
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size  # replicated over tp, counted once per shard
    assert per_slice * 8 == cfg.num_params() + 7 * norms
    assert "rank 0: 0F0" in out and "rank 3:" in out


def test_the_same_layout_without_dry_run_is_refused_on_a_cpu(capsys):
    assert main(["train", "--model", "llama3-70b", "--tp", "8"]) == 2
    assert "--dry-run" in capsys.readouterr().err
