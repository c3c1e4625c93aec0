"""Checkpoints: saved in one layout, loaded in others with the full state equal bit for bit
and training going on as if never stopped; atomic publication; clear errors for corrupt
files; stop and resume flags; Hugging Face export and import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshpar.checkpoint import CheckpointError, CheckpointReader, latest_checkpoint, open_checkpoint
from meshpar.checkpoint.commands import model_of
from meshpar.checkpoint.regions import Box
from meshpar.checkpoint.store import share_files
from meshpar.config import ConfigError, check, validate
from meshpar.mesh import MeshShape, ParallelMesh
from reference import fast_config, train_and_report as train, trainer_on_this_rank
from test_composition import layout_config

STEPS, STOP = 6, 3
KINDS = ("param", "exp_avg", "exp_avg_sq")
REPO = Path(__file__).resolve().parent.parent


def resume_and_resave(cfg, resave_dir: str) -> dict:
    """Load cfg's checkpoint (--resume), write it straight back to `resave_dir` from this
    layout, then train on; the losses and final parameters."""
    with trainer_on_this_rank(cfg) as trainer:
        cfg.checkpoint.save_dir = resave_dir
        trainer.save_checkpoint()
        result = trainer.run()
        return {"losses": [s["loss"] for s in result.steps], "params": result.parallel.full_state(),
                "started_from": result.summary["started_from"]}


def saved_layout(**kw):
    cfg = layout_config(2, 2, 2, 1, zero=1, steps=STEPS)
    for key, value in kw.items():
        cfg.update(**{key: value})
    return cfg


def stored_elements(reader: CheckpointReader) -> int:
    return sum(stop - start for boxes in reader.index.values() for parts in boxes.values()
               for _file, _key, start, stop in parts)


def assert_same_state(a: Path, b: Path):
    """Every full tensor (parameters, both moments) and every counter equal, bit for bit."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    for reader in (ra, rb):  # every element once: replicas write nothing, no rank writes another's
        assert stored_elements(reader) == len(KINDS) * model_of(reader).num_params()
    for kind in KINDS:
        assert ra.names(kind) == rb.names(kind) and ra.names(kind), kind
        for name in ra.names(kind):
            assert torch.equal(ra.read_full(name, kind), rb.read_full(name, kind)), f"{kind} of {name}"
    assert ra.meta["train"] == rb.meta["train"]


TARGETS = {  # (dp, tp, pp, cp, zero)
    "dp1-tp4-pp2": (1, 4, 2, 1, 0),
    "dp8-zero3": (8, 1, 1, 1, 3),
    "one device": (1, 1, 1, 1, 0),
}
MORE_TARGETS = {
    "tp8 (replicated kv heads)": (1, 8, 1, 1, 2),
    "dp2-tp2-cp2-zero2": (2, 2, 1, 2, 2),
}


def target_config(dp, tp, pp, cp, zero, save_dir):
    cfg = layout_config(dp, tp, pp, cp, zero=zero, steps=STEPS)
    cfg.checkpoint.save_dir, cfg.checkpoint.resume = str(save_dir), True
    return cfg


def test_saved_at_dp2_tp2_pp2_loads_in_any_layout_and_trains_on(worlds, tmp_path):
    reshard_and_train_on(worlds(8), tmp_path, TARGETS)


@pytest.mark.slow  # 12 s; the quick test above reshards to pp, ZeRO-3 and one device
def test_saved_at_dp2_tp2_pp2_loads_at_tp8_and_with_cp(worlds, tmp_path):
    reshard_and_train_on(worlds(8), tmp_path, MORE_TARGETS)


def reshard_and_train_on(world, tmp_path, targets):
    whole = world.run(train, saved_layout())[0]
    stopped = world.run(train, saved_layout(save_dir=str(tmp_path / "saved"), stop_after_step=STOP))[0]
    assert stopped["losses"] == whole["losses"][:STOP]
    assert "--stop-after-step 3" in stopped["summary"]["stopped"]
    checkpoint = latest_checkpoint(tmp_path / "saved")
    assert checkpoint.name == "step-00000003" and len(list(checkpoint.glob("rank-*.safetensors"))) == 8
    for label, layout in targets.items():
        own = tmp_path / label.split()[0]
        shutil.copytree(tmp_path / "saved", own)
        cfg = target_config(*layout, own)
        resave = str(tmp_path / f"{label.split()[0]}-resaved")
        report = (world.run(resume_and_resave, cfg, resave)[0] if cfg.mesh.world_size > 1
                  else resume_and_resave(cfg, resave))
        assert report["started_from"].startswith("resumed from"), label
        assert_same_state(checkpoint, Path(resave) / checkpoint.name)  # (it also saved its step 6 there)
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(whole["losses"][STOP:]),
                                   rtol=1e-6, atol=0, msg=lambda m: f"{label}: {m}")
        for name, value in whole["params"].items():
            torch.testing.assert_close(report["params"][name], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{label} {name}: {m}")


EXACT_VARIANTS = {  # what else is part of a run's state, restored in the same layout
    "dropout RNG, dp2 x tp2 ZeRO-2": {"tp": 2, "zero": 2, "model": {"dropout": 0.1}},
    "int8 error feedback": {"grad_compression": "int8"},
    "fp16 loss scale, ZeRO-2 offload": {"zero": 2, "offload": ["optimizer"], "precision": "fp16",
                                        "loss_scale_growth_interval": 2},  # the scale moves
}


def tied_config(dp, tp, pp, zero, save_dir=None, **train):
    cfg = layout_config(dp, tp, pp, 1, zero=zero, steps=STEPS)
    cfg.model.overrides["tie_embeddings"] = True
    cfg.checkpoint.save_dir = str(save_dir) if save_dir else None
    for key, value in train.items():
        cfg.update(**{key: value})
    return cfg


def test_a_tied_embedding_across_stages_is_saved_once_and_loads_anywhere(worlds, tmp_path):
    """Saved on pp2 x dp2 (ZeRO-1), where the first and the last stage both hold the
    weight: stored once (by the first), and a one-device run and a pp4 run resume from it
    as if never stopped."""
    world = worlds(4)
    whole = world.run(train, tied_config(2, 1, 2, 1))[0]
    world.run(train, tied_config(2, 1, 2, 1, tmp_path / "saved", stop_after_step=STOP))
    checkpoint = latest_checkpoint(tmp_path / "saved")
    for label, (dp, tp, pp, zero) in {"one device": (1, 1, 1, 0), "pp4": (1, 1, 4, 0)}.items():
        own = tmp_path / label.replace(" ", "-")
        shutil.copytree(tmp_path / "saved", own)
        cfg = tied_config(dp, tp, pp, zero, own, resume=True)
        resave = str(own) + "-resaved"
        report = world.run(resume_and_resave, cfg, resave)[0] if pp > 1 else resume_and_resave(cfg, resave)
        assert_same_state(checkpoint, Path(resave) / checkpoint.name)  # every element stored once
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(whole["losses"][STOP:]),
                                   rtol=1e-6, atol=0, msg=lambda m: f"{label}: {m}")
        for name, value in whole["params"].items():
            torch.testing.assert_close(report["params"][name], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_resume_in_the_same_layout_is_bit_identical(worlds, tmp_path, variant):
    """Stopped after step 3 and resumed: the losses and final parameters of the run that
    never stopped, exactly - RNG, error-feedback buffers and loss scaler included."""
    def cfg(**kw):
        options = dict(EXACT_VARIANTS[variant])
        c = fast_config(dp=2, tp=options.pop("tp", 1), steps=STEPS, model=options.pop("model", None),
                        save_dir=str(tmp_path), **kw)
        for key, value in options.items():
            c.update(**{key: value})
        return c
    world = worlds(cfg().mesh.world_size)
    whole = world.run(train, cfg())[0]
    shutil.rmtree(tmp_path)
    world.run(train, cfg(stop_after_step=STOP))
    resumed = world.run(train, cfg(resume=True))[0]
    assert resumed["losses"] == whole["losses"][STOP:]
    assert all(torch.equal(resumed["params"][n], v) for n, v in whole["params"].items())
    if "fp16" in variant:
        assert resumed["summary"]["final_loss_scale"] == whole["summary"]["final_loss_scale"] != 65536.0


def test_single_device_stop_resume_and_retention(tmp_path):
    def cfg(**kw):
        return fast_config(steps=8, save_dir=str(tmp_path), save_every=2, keep_checkpoints=2, **kw)
    whole = train(cfg())
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000006", "step-00000008"]
    shutil.rmtree(tmp_path)
    (tmp_path / ".step-00000004.tmp").mkdir(parents=True)  # a save that was killed
    first = train(cfg(stop_after_minutes=1e-9, metrics_file=str(tmp_path / "m.jsonl")))
    assert len(first["losses"]) == 1 and "--stop-after-minutes" in first["summary"]["stopped"]
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / ".step-00000004.tmp").exists()  # removed by the next save
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a line cut short by a kill
    rest = train(cfg(resume=True, metrics_file=str(tmp_path / "m.jsonl")))
    assert first["losses"] + rest["losses"] == whole["losses"]
    assert all(torch.equal(rest["params"][n], v) for n, v in whole["params"].items())
    steps = [r["step"] for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9))  # the resumed run's metrics carry on from step 1's
    again = train(cfg(resume=True))  # resuming a finished run trains nothing
    assert again["losses"] == [] and again["summary"]["steps"] == 0


def corrupt_copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return latest_checkpoint(destination)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    train(fast_config(steps=2, save_dir=str(root)))
    return root


def test_corrupt_or_truncated_files_are_named(small_checkpoint, tmp_path):
    good = latest_checkpoint(small_checkpoint)
    file = "rank-00000.safetensors"

    flipped = corrupt_copy(small_checkpoint, tmp_path / "flipped")
    data = bytearray((flipped / file).read_bytes())
    data[-100] ^= 0xFF
    (flipped / file).write_bytes(bytes(data))
    reader = CheckpointReader(flipped)  # the header is fine; the data is not
    with pytest.raises(CheckpointError, match=f"{file}: its sha256 differs"):
        reader.read_full("norm.weight")

    cut = corrupt_copy(small_checkpoint, tmp_path / "cut")
    (cut / file).write_bytes((good / file).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{file}: 1000 bytes, the checkpoint recorded"):
        CheckpointReader(cut)

    broken = corrupt_copy(small_checkpoint, tmp_path / "meta")
    (broken / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="meta.json: unreadable"):
        CheckpointReader(broken)

    unpublished = corrupt_copy(small_checkpoint, tmp_path / "unpublished")
    (unpublished / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointReader(tmp_path / "unpublished")

    out = subprocess.run([sys.executable, "-m", "meshpar", "checkpoint", "info", "--verify", str(flipped)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and f"{file}: its sha256 differs" in out.stderr and "Traceback" not in out.stderr


def verify_here(path: Path, world_size: int):
    """On every rank: verify `path` collectively; (bytes this rank hashed, files it
    trusts now), or the error it raised."""
    mesh = ParallelMesh.build(MeshShape(dp=world_size))
    try:
        reader = CheckpointReader(path)
        reader.verify(mesh)
        return reader.hashed_bytes, sorted(reader._verified)
    except CheckpointError as err:
        return str(err)
    finally:
        mesh.destroy()


def test_each_file_is_hashed_by_one_rank_and_corruption_stops_every_rank(worlds, tmp_path):
    world = worlds(4)
    cfg = layout_config(2, 2, 1, 1, zero=1, steps=2)
    cfg.checkpoint.save_dir = str(tmp_path / "ck")
    world.run(train, cfg)
    checkpoint = latest_checkpoint(tmp_path / "ck")
    files = CheckpointReader(checkpoint).meta["files"]
    sizes = sorted(f["bytes"] for f in files.values())
    hashed, trusted = zip(*world.run(verify_here, checkpoint, 4))
    assert sorted(hashed) == sizes  # four files of four ranks: one each, none read twice
    assert all(t == sorted(files) for t in trusted)  # every rank trusts every file, none re-hashes it
    assert share_files({"a": 5, "b": 4, "c": 3, "d": 3}, 2) == [["a", "d"], ["b", "c"]]

    flipped = corrupt_copy(tmp_path / "ck", tmp_path / "flipped")
    data = bytearray((flipped / "rank-00002.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (flipped / "rank-00002.safetensors").write_bytes(bytes(data))
    errors = world.run(verify_here, flipped, 4)
    assert len(set(errors)) == 1 and "rank-00002.safetensors: its sha256 differs" in errors[0], errors


def test_flags_are_checked_before_any_process_group(small_checkpoint, tmp_path):
    assert any("--save-every needs --save-dir" in p for p in validate(fast_config(save_every=2)))
    assert any("--resume needs --save-dir" in p for p in validate(fast_config(resume=True)))
    cfg = fast_config(dp=1, save_dir=str(tmp_path))
    cfg.mesh.pp, cfg.pipeline.schedule, cfg.data.micro_batch_size = 2, "async", 8
    assert any("--save-dir with --schedule async is not supported" in p for p in validate(cfg))
    other = fast_config(save_dir=str(small_checkpoint), resume=True, model={"hidden_size": 128})
    assert any("holds another model" in p and "hidden_size 128 (checkpoint 64)" in p for p in validate(other))
    assert any("no such file" in p for p in validate(fast_config(init_from=str(tmp_path / "nothing"))))
    with pytest.raises(ConfigError):
        check(fast_config(keep_checkpoints=0, save_dir=str(tmp_path)))


def test_info_and_convert_consolidate_into_one_file(small_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "meshpar", "checkpoint", "info", str(small_checkpoint), "--verify"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "step 2" in out and "exp_avg_sq    75 tensors" in out and "sha256 matches" in out
    subprocess.run([sys.executable, "-m", "meshpar", "checkpoint", "convert", str(small_checkpoint),
                    str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    consolidated = latest_checkpoint(tmp_path)
    assert len(list(consolidated.glob("*.safetensors"))) == 1
    assert_same_state(latest_checkpoint(small_checkpoint), consolidated)


def test_boxes_cut_any_layout_out_of_any_other():
    """A (6, 4) tensor saved as two row halves, read as three column-agnostic thirds
    and as a padded (4, 4) box at offset 4."""
    from meshpar.checkpoint.regions import fill_box
    full = torch.arange(24.0).reshape(6, 4)
    halves = [(Box((6, 4), (3 * i, 0), (3, 4), (3, 4)), full[3 * i:3 * i + 3]) for i in range(2)]
    for i in range(3):
        assert torch.equal(fill_box(Box((6, 4), (2 * i, 0), (2, 4), (2, 4)), halves, "t"), full[2 * i:2 * i + 2])
    padded = fill_box(Box((6, 4), (4, 0), (2, 4), (4, 4)), halves, "t")
    assert torch.equal(padded[:2], full[4:]) and not padded[2:].any()
    with pytest.raises(CheckpointError, match="holds 12 of the 24"):
        fill_box(Box.whole((6, 4)), halves[:1], "t")


def test_hugging_face_round_trip(small_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from meshpar.model.llama import Transformer

    subprocess.run([sys.executable, "-m", "meshpar", "checkpoint", "export-hf", str(small_checkpoint),
                    str(tmp_path / "hf")], check=True, capture_output=True, cwd=REPO)
    reader = open_checkpoint(small_checkpoint)
    ours = Transformer(model_of(reader)).eval()
    ours.load_state_dict({name: reader.read_full(name) for name in reader.names()})
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    back = open_checkpoint(tmp_path / "hf")  # import: read as a checkpoint's parameters
    assert back.names() == reader.names()
    for name in reader.names():
        assert torch.equal(back.read_full(name), reader.read_full(name)), name
    # A rank reads its box only: rows of wq rounded out to whole heads, a column cut's columns.
    wq, down = "layers.1.attention.wq.weight", "layers.1.mlp.w_down.weight"
    rows, cols = reader.full_shape(wq)
    for name, box in ((wq, Box((rows, cols), (12, 0), (20, 64), (20, 64))),
                      (down, Box(reader.full_shape(down), (0, 96), (64, 96), (64, 96)))):
        fresh = open_checkpoint(tmp_path / "hf")
        part = fresh.read(name, "param", box)
        inside = tuple(slice(o, o + v) for o, v in zip(box.offsets, box.valid))
        assert torch.equal(part, reader.read_full(name)[inside]), name
        head_dim = rows // model_of(reader).num_heads  # 8: rows 12-31 lie in heads 1-3
        expected = (24 * cols if name == wq else 64 * 96) * 4
        assert fresh.bytes_read == expected, (name, fresh.bytes_read, expected, head_dim)
    # Several files with an index, as transformers writes large models: read the same.
    from safetensors.torch import load_file, save_file
    shards = tmp_path / "hf-shards"
    shards.mkdir()
    for f in ("config.json",):
        (shards / f).write_text((tmp_path / "hf" / f).read_text())
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, shards / file)
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in halves.items() for k in keys}}))
    split = open_checkpoint(shards)
    for name in reader.names():
        assert torch.equal(split.read_full(name), reader.read_full(name)), name
    # A directory whose tensor differs from the model: the first such tensor named, exit 2.
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:32]
    bad = tmp_path / "hf-bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(tensors, bad / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "meshpar", "train", "--init-from", str(bad), "--steps", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "layers.0.attention.wq.weight has shape (32, 64) there, (64, 64) in the model" in out.stderr, out.stderr
    # and as --init-from starts a run (one step at a negligible learning rate)
    start = train(fast_config(steps=1, init_from=str(tmp_path / "hf"), lr=1e-12))
    for name in reader.names():
        torch.testing.assert_close(start["params"][name], reader.read_full(name), rtol=0, atol=1e-9)


def test_a_tied_model_exports_to_hugging_face_and_starts_a_pipeline_from_it(worlds, tmp_path):
    """Saved on pp2 (the weight stored once), exported with tie_word_embeddings: the
    transformers model's logits are ours; --init-from it on pp2 fills both stages' copies."""
    transformers = pytest.importorskip("transformers")
    from meshpar.model.llama import Transformer

    world = worlds(2)
    world.run(train, tied_config(1, 1, 2, 0, tmp_path / "saved", steps=3))
    reader = open_checkpoint(tmp_path / "saved")
    subprocess.run([sys.executable, "-m", "meshpar", "checkpoint", "export-hf", str(reader.path),
                    str(tmp_path / "hf")], check=True, capture_output=True, cwd=REPO)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    ours = Transformer(model_of(reader)).eval()
    ours.load_state_dict({name: reader.read_full(name) for name in reader.names()}, strict=False)
    assert ours.output.weight is ours.embedding.weight
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    starts = world.run(train, tied_config(1, 1, 2, 0, init_from=str(tmp_path / "hf"), steps=1, lr=1e-12))
    for name in reader.names():
        torch.testing.assert_close(starts[1]["params"][name], reader.read_full(name), rtol=0, atol=1e-9)


KILL_STEPS, KILL_EVERY = 12, 4


def kill_test_config(save_dir):
    cfg = fast_config(dp=2, tp=2, steps=KILL_STEPS, model={"dropout": 0.1}, save_dir=str(save_dir),
                      save_every=KILL_EVERY, eval_batches=1)
    cfg.zero.stage = 1
    return cfg


def torchrun(save_dir: Path, fault: str, tmp_path: Path) -> tuple[str, float]:
    """The kill test's run as a user would start it: torchrun, 4 ranks, one restart allowed."""
    (tmp_path / "model.toml").write_text('[model]\nname = "tiny"\ndropout = 0.1\n')
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "--max-restarts", "1", str(REPO / "tests" / "kill_one_rank.py"), fault, "train", "--config", str(tmp_path / "model.toml"),
               "--dp", "2", "--tp", "2", "--zero", "1", "--steps", str(KILL_STEPS), "--global-batch-size", "16",
               "--seq-len", "64", "--warmup-steps", "5", "--eval-every", "0", "--eval-batches", "1",
               "--save-dir", str(save_dir), "--save-every", str(KILL_EVERY), "--resume", "--no-progress",
               "--metrics-file", str(save_dir / "metrics.jsonl")]
    start = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr, time.monotonic() - start


def test_each_attempt_gets_a_prefix_only_in_a_store_shared_across_restarts(capsys):
    """Under torchrun's shared store the attempt is named by the restart count (and a
    warning says several nodes need a fresh store per round); with a fresh store per round
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) or outside torchrun, nothing is added."""
    from datetime import timedelta

    import torch.distributed as dist

    from meshpar.train.launch import free_port, restart_safe_store
    port, timeout = free_port(), timedelta(seconds=10)
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timeout)
    env = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert restart_safe_store(timeout, {}) == {}
    assert restart_safe_store(timeout, {**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) == {}
    shared = restart_safe_store(timeout, {**env, "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "3"})
    shared["store"].set("key", "value")
    assert server.get("meshpar/attempt-2/key") == b"value" and (shared["rank"], shared["world_size"]) == (0, 4)
    assert "warning" not in capsys.readouterr().err
    restart_safe_store(timeout, {**env, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"})
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().err


# Slow (40 s: torchrun restarts after a SIGKILL, twice).
@pytest.mark.slow
def test_a_killed_rank_restarts_under_torchrun_and_ends_bit_identical(worlds, tmp_path):
    """SIGKILL of one rank mid-run, and of another while a checkpoint is being written:
    torchrun stops the others and restarts the job, which resumes from the newest
    complete checkpoint and ends with the state of a run never interrupted."""
    worlds(4).run(train, kill_test_config(tmp_path / "whole"))
    whole = latest_checkpoint(tmp_path / "whole")

    output, seconds = torchrun(tmp_path / "killed", "2:step:6", tmp_path)
    assert "failed (exitcode: -9) local_rank: 2" in output
    assert f"resumed from {tmp_path / 'killed' / 'step-00000004'}" in output
    assert_same_state(whole, latest_checkpoint(tmp_path / "killed"))
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, KILL_STEPS + 1))

    output, _ = torchrun(tmp_path / "killed-saving", "1:save:8", tmp_path)
    assert "failed (exitcode: -9) local_rank: 1" in output
    assert f"resumed from {tmp_path / 'killed-saving' / 'step-00000004'}" in output  # 8 was never published
    assert_same_state(whole, latest_checkpoint(tmp_path / "killed-saving"))
    print(f"killed and restarted run: {seconds:.0f} s")


class Killed(Exception):
    """A save stopped dead at one of its filesystem operations."""


@pytest.mark.parametrize("step, resaved", [(2, False), (1, True)])
def test_a_save_killed_at_any_point_leaves_the_newest_complete_checkpoint_loadable(tmp_path, monkeypatch, step,
                                                                                  resaved):
    """Every filesystem operation of a save in turn (each write, fsync, rename, exchange,
    removal) stops it: afterwards the newest complete checkpoint loads and verifies and
    holds either the old values or the new ones whole - also when the save replaces the
    same step (`resaved`) - and the next save leaves nothing of the killed one behind."""
    import meshpar
    from meshpar import durable

    model = meshpar.parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)), ParallelMesh.single(), meshpar.Plan())
    weight = model.module[0].weight

    def save(root: Path, value: float, at: int) -> None:
        with torch.no_grad():
            weight.fill_(value)
        model.steps_taken = at
        model.save(root, keep=3)

    operations = ("write_durably", "fsync_dir", "rename", "exchange", "remove")
    originals = {name: getattr(durable, name) for name in operations}
    counted, kill_at = [], None

    def counting(name):
        def operation(*args):
            counted.append(name)
            if len(counted) == kill_at:
                raise Killed(name)
            return originals[name](*args)
        return operation

    for name in operations:
        monkeypatch.setattr(durable, name, counting(name))
    save(tmp_path / "whole", 1.0, 1)
    counted.clear()
    save(tmp_path / "whole", 2.0, step)  # uninterrupted: how many operations a save makes
    points = list(counted)
    assert "exchange" in points if resaved else "exchange" not in points
    for kill_at in range(1, len(points) + 1):
        root = tmp_path / f"killed-{kill_at}"
        counted.clear()
        kill_at, armed = None, kill_at
        save(root, 1.0, 1)
        counted.clear()
        kill_at = armed
        with pytest.raises(Killed):
            save(root, 2.0, step)
        kill_at = None
        newest = latest_checkpoint(root)
        reader = CheckpointReader(newest)
        reader.verify(ParallelMesh.single())
        value = reader.read_full("0.weight")
        assert (reader.step, float(value[0, 0])) in ((1, 1.0), (step, 2.0)), (points[armed - 1], reader.step)
        assert torch.all(value == value[0, 0])
        save(root, 3.0, 3)
        left = {p.name for p in root.iterdir()}
        assert {"step-00000001", "step-00000003"} <= left <= {"step-00000001", f"step-{step:08d}", "step-00000003"}
        assert all((root / name / "COMPLETE").is_file() for name in left), (points[armed - 1], left)
    print(f"{len(points)} points of the save killed: {', '.join(points)}")
