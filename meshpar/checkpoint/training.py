"""What a training run's checkpoint holds, and how a trainer saves and restores it.

Saved by every rank, once per distinct piece: each parameter's box (regions.py) and,
under ZeRO 1-3, only its own flat range of it - as a parameter value and AdamW's two
moments. Ranks holding a replica (over dp below ZeRO-1, over tp for unsharded weights,
over cp for everything) write nothing of it. Rank 0 adds the counters every rank shares:
the step, AdamW's step, the data loader's position, the loss scaler. Each rank adds its
own RNG and error-feedback buffers, restored only into the same layout (elsewhere the
RNG is reseeded from the step and the buffers start empty).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from meshpar.checkpoint.regions import Box, CheckpointError, first_holder
from meshpar.checkpoint.store import LOCAL, CheckpointReader, write_checkpoint
from meshpar.init import boxes_of
from meshpar.parallel.dropout import dropout_seed
from meshpar.parallel.sharding import model_names

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout_of(cfg) -> dict:
    """Everything that decides which rank holds which bytes (and its RNG stream)."""
    par = cfg.parallel
    return {"world_size": par.world_size, "pp": par.pp, "dp": par.dp, "cp": par.cp, "tp": par.tp,
            "virtual_stages": par.virtual_stages, "pp_layers": par.pp_layers, "zero": par.zero,
            "bucket_mb": par.bucket_mb, "sequence_parallel": par.sequence_parallel,
            "grad_compression": par.grad_compression, "hierarchical_allreduce": par.hierarchical_allreduce,
            "micro_batch_size": cfg.train.micro_batch_size}


def model_meta(cfg) -> dict:
    return {"name": cfg.model.name, **dataclasses.asdict(cfg.model.resolve())}


def _names(trainer) -> dict[int, str]:
    return {id(p): name for name, p in model_names(trainer.model)}


@dataclass(frozen=True)
class Part:
    """One saved tensor of a parameter: its name, its box of that tensor, and where its
    elements lie in the parameter's local tensor (flattened)."""

    name: str
    box: Box
    start: int
    numel: int


def saved_parts(name: str, p: nn.Parameter, mesh) -> list[Part]:
    """How a parameter is saved: as itself, its local tensor being one box of the full
    one - or, fused (q, k and v in one projection: on each tp rank its rows of each
    part, no one box of the whole), as its k parts `name#0` .. `name#k-1`, each split
    like any column weight. Every layout of the same plan names them alike (at tp = 1
    too), so what one saved loads into any other."""
    boxes = boxes_of(p, mesh)
    if len(boxes) == 1:
        return [Part(name, boxes[0][1], 0, p.numel())]
    k, row = len(boxes), p[0].numel()
    parts = []
    for j, (rows, box) in enumerate(boxes):  # `box` is in the whole tensor's rows: part j's are shifted
        part_rows = box.full_shape[0] // k
        part = Box((part_rows, *box.full_shape[1:]), (box.offsets[0] - j * part_rows, *box.offsets[1:]), box.valid,
                   box.local_shape)
        parts.append(Part(f"{name}#{j}", part, rows.start * row, (rows.stop - rows.start) * row))
    return parts


def optimizer_state_pieces(dp, optimizer, mesh, parts_of: Callable[[nn.Parameter], list[Part]]
                           ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The parameter values and AdamW moments this rank writes, as (tensors, their
    descriptions): each optimizer piece it owns, cut along `parts_of(param)`; replicas
    (over dp below ZeRO-1, over tp and cp) write nothing."""
    writes_replicas = dp.stage >= 1 or mesh.index("dp") == 0
    tensors, pieces = {}, []
    for piece in dp.optimizer_pieces:
        if not (writes_replicas and first_holder(piece.param, mesh)):
            continue
        state = optimizer.state.get(piece.leaf, {})
        for part in parts_of(piece.param):
            lo, hi = max(piece.start, part.start), min(piece.stop, part.start + part.numel)
            if lo >= hi:
                continue
            for kind, value in (("param", piece.leaf), *((m, state.get(m)) for m in MOMENTS)):
                if value is None:  # no optimizer step taken yet: no moments
                    continue
                key = f"{part.name}/{kind}/{'.'.join(map(str, part.box.offsets))}/{lo - part.start}"
                tensors[key] = value.detach().reshape(-1)[lo - piece.start:hi - piece.start]
                pieces.append({"key": key, "name": part.name, "kind": kind, "box": part.box.to_json(),
                               "start": lo - part.start, "stop": hi - part.start})
    return tensors, pieces


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's random-number generators' states (the host's, and the GPU's on one), as
    a checkpoint keeps them among the rank's own tensors."""
    out = {LOCAL + "rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out[LOCAL + "rng/cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(local: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what `rng_tensors` saved (`local`: the rank's own tensors, unprefixed)."""
    torch.set_rng_state(local["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in local:
        torch.cuda.set_rng_state(local["rng/cuda"], device)


def rank_tensors(trainer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """What this rank writes: its pieces (and their descriptions) and its own state."""
    mesh, dp = trainer.mesh, trainer.data_parallel
    names = _names(trainer)
    tensors, pieces = optimizer_state_pieces(dp, trainer.optimizer, mesh, lambda p: saved_parts(names[id(p)], p, mesh))
    tensors.update(rng_tensors(trainer.device))
    reducer = dp.reducer
    for kind, buffers in (("errors", reducer.errors), ("shard_errors", reducer.shard_errors)):
        for key, value in buffers.items():
            tensors[f"{LOCAL}feedback/{kind}/{key}"] = value
    return tensors, pieces


def save_training(trainer, before_publish=None) -> Path:
    """Collective: write the trainer's state as checkpoint `trainer.step` under its save dir."""
    tr = trainer.cfg.train
    tensors, pieces = rank_tensors(trainer)
    meta = {"model": model_meta(trainer.cfg), "layout": layout_of(trainer.cfg),
            "train": {"step": trainer.step, "optimizer_step": trainer.step - trainer.skipped_steps,
                      "skipped_steps": trainer.skipped_steps, "seed": tr.seed,
                      "loader": trainer.loader.state_dict(),
                      "loss_scaler": trainer.scaler.state_dict() if trainer.scaler else None}}
    return write_checkpoint(tr.save_dir, trainer.step, trainer.mesh, tensors, pieces, meta, tr.keep_checkpoints,
                            before_publish)


def read_local(reader, kind: str, parts: list[Part]) -> torch.Tensor:
    """A parameter's whole local tensor of `kind` (flattened), read part by part."""
    return torch.cat([reader.read(part.name, kind, part.box).reshape(-1) for part in parts])


def load_moments(dp, optimizer, reader, optimizer_step: int, parts_of: Callable[[nn.Parameter], list[Part]]):
    """AdamW's moments (each optimizer piece's range of them) and its step count, after
    `optimizer_step` steps (none yet: nothing to load)."""
    if optimizer_step == 0:
        return
    group = optimizer.param_groups[0]
    step_on_device = group.get("fused") or group.get("capturable")  # where AdamW keeps its step
    for piece in dp.optimizer_pieces:
        state = {"step": torch.tensor(float(optimizer_step), device=piece.leaf.device if step_on_device else "cpu")}
        for kind in MOMENTS:
            values = read_local(reader, kind, parts_of(piece.param))[piece.start:piece.stop]
            state[kind] = torch.empty_like(piece.leaf).copy_(values)
        optimizer.state[piece.leaf] = state


def load_parameters(trainer, reader) -> None:
    """Every parameter from `reader` (a CheckpointReader or a Hugging Face directory's)."""
    names, mesh = _names(trainer), trainer.mesh
    trainer.data_parallel.load_params(lambda p: read_local(reader, "param", saved_parts(names[id(p)], p, mesh)))


def restore_training(trainer, reader: CheckpointReader) -> None:
    """The whole state of the run that saved `reader`'s checkpoint, in this trainer's layout."""
    load_parameters(trainer, reader)
    saved = reader.meta["train"]
    if saved is None:
        raise CheckpointError(f"{reader.path}: holds parameters only (no training state to resume); "
                              f"start from it with --init-from instead")
    names, mesh, dp = _names(trainer), trainer.mesh, trainer.data_parallel
    load_moments(dp, trainer.optimizer, reader, saved["optimizer_step"], lambda p: saved_parts(names[id(p)], p, mesh))
    trainer.step = saved["step"]
    trainer.skipped_steps = saved["skipped_steps"]
    trainer.loader.load_state_dict(saved["loader"])
    if trainer.scaler and saved["loss_scaler"]:
        trainer.scaler.load_state_dict(saved["loss_scaler"])
    if reader.meta["layout"] == layout_of(trainer.cfg):
        local = reader.local_state(mesh.rank)
        restore_rng(local, trainer.device)
        reducer = dp.reducer
        for key, value in local.items():
            if key.startswith("feedback/"):
                _, kind, bucket = key.split("/")
                getattr(reducer, kind)[int(bucket)] = value.to(trainer.device)
    else:  # another layout: fresh dropout streams, a function of the step
        torch.manual_seed(dropout_seed(trainer.cfg.train.seed, mesh, trainer.step))
