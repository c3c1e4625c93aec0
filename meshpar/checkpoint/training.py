"""What a training checkpoint holds, and how a `Parallelized` - the trainer's model or
the Python API's - saves and restores it, in any layout.

Saved by every rank, once per distinct piece: each parameter's box (regions.py) and,
under ZeRO 1-3, only its own flat range of it - as a parameter value and AdamW's two
moments. Ranks holding a replica (over dp below ZeRO-1, over tp for unsharded weights,
over cp for everything) write nothing of it. Rank 0 adds the counters every rank shares:
the step, AdamW's step, the loss scaler, and the caller's own (the trainer's data
position and seed; the API caller's `extra`). Each rank adds its own RNG and
error-feedback buffers, restored only into the same layout (elsewhere the caller
reseeds and the buffers start empty).

A fused column parameter (q, k and v in one projection) holds on each tp rank its rows of
each of its k parts, so its local tensor is no box of the full one. It is saved as k
tensors, `name#0` .. `name#k-1`: part j alone, split over tp like any column weight - at
tp = 1 too, where the plan still says it is fused, so every layout names it alike.
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
from meshpar.parallel.sharding import sharded_over

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout_of(parallelized) -> dict:
    """Everything that decides which rank holds which bytes (and its RNG stream)."""
    mesh, dp = parallelized.mesh, parallelized.data_parallel
    return {"world_size": mesh.world_size, **{axis: mesh.size(axis) for axis in ("pp", "dp", "cp", "tp")},
            **({"ep": mesh.size("ep")} if mesh.size("ep") > 1 else {}),
            "virtual_stages": parallelized.virtual_stages, "schedule": parallelized.schedule,
            "stage_blocks": parallelized.split.stage_counts,
            "zero": dp.stage, "bucket_bytes": dp.bucket_bytes, "sequence_parallel": parallelized.sequence_parallel,
            "grad_compression": dp.reducer.compression, "hierarchical_allreduce": dp.reducer.hierarchical,
            "microbatches": parallelized.microbatches}


def model_meta(cfg) -> dict:
    """The model a run's checkpoint holds: its name and shape, and a transformers
    model's config.json (what `export-hf` writes back)."""
    meta = {"name": cfg.model.name, **dataclasses.asdict(cfg.model.resolve())}
    if cfg.model.directory() is not None:
        meta["transformers"] = cfg.model.directory().raw
    return meta


def _parts_of(parallelized) -> Callable[[nn.Parameter], list[Part]]:
    """param -> its saved parts, under the whole model's names."""
    names = {id(p): name for name, p in parallelized.named_parameters()}
    return lambda p: saved_parts(names[id(p)], p, parallelized.mesh)


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
    tensors, pieces = {}, []
    for piece in dp.optimizer_pieces:
        replicated_over = "edp" if sharded_over(piece.param, "ep") else "dp"  # experts: their ep rank's own
        if not ((dp.stage >= 1 or mesh.index(replicated_over) == 0) and first_holder(piece.param, mesh)):
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


def rank_tensors(parallelized) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """What this rank writes: its pieces (and their descriptions) and its own state."""
    mesh, dp = parallelized.mesh, parallelized.data_parallel
    tensors, pieces = optimizer_state_pieces(dp, parallelized.optimizer, mesh, _parts_of(parallelized))
    tensors.update(rng_tensors(parallelized.device()))
    for b in dp.buckets:  # error feedback, bucket by bucket (each in its reducer: dp's, or the experts' edp's)
        for kind in ("errors", "shard_errors"):
            if b.index in getattr(b.reducer, kind):
                tensors[f"{LOCAL}feedback/{kind}/{b.index}"] = getattr(b.reducer, kind)[b.index]
    return tensors, pieces


def save_state(parallelized, directory: str | Path, keep: int, model: dict, train: dict) -> Path:
    """Collective: write `parallelized`'s state as checkpoint `step-<steps taken>` under
    `directory`, the newest `keep` kept: `model` describes the model, `train` holds the
    caller's own counters (JSON; rank 0's is written)."""
    tensors, pieces = rank_tensors(parallelized)
    step, skipped = parallelized.steps_taken, parallelized.skipped_steps
    meta = {"model": model, "layout": layout_of(parallelized),
            "train": {"step": step, "optimizer_step": step - skipped, "skipped_steps": skipped,
                      "loss_scaler": parallelized.scaler.state_dict() if parallelized.scaler else None, **train}}
    return write_checkpoint(directory, step, parallelized.mesh, tensors, pieces, meta, keep)


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


def load_parameters(parallelized, reader) -> None:
    """Every parameter from `reader` (a CheckpointReader or a Hugging Face directory's),
    each rank reading only its boxes."""
    parts_of = _parts_of(parallelized)
    parallelized.data_parallel.load_params(lambda p: read_local(reader, "param", parts_of(p)))


def restore_state(parallelized, reader: CheckpointReader, how_to_start: str) -> tuple[dict, bool]:
    """Everything `save_state` wrote, into `parallelized`'s layout: returns the saved
    counters (the caller's among them) and whether the layout is the one that saved them
    (then each rank's RNG and error feedback came back too; else the caller reseeds).
    A checkpoint of parameters only is refused, with `how_to_start` from it instead."""
    saved = reader.meta["train"]
    if saved is None:
        raise CheckpointError(f"{reader.path}: holds parameters only (no training state to resume); "
                              f"{how_to_start}")
    load_parameters(parallelized, reader)
    dp = parallelized.data_parallel
    load_moments(dp, parallelized.optimizer, reader, saved["optimizer_step"], _parts_of(parallelized))
    parallelized.steps_taken = saved["step"]
    parallelized.skipped_steps = saved.get("skipped_steps", 0)
    if parallelized.scaler and saved.get("loss_scaler"):  # fp16 resumes at its scale
        parallelized.scaler.load_state_dict(saved["loss_scaler"])
    same_layout = reader.meta["layout"] == layout_of(parallelized)
    if same_layout:
        local = reader.local_state(parallelized.mesh.rank)
        restore_rng(local, parallelized.device())
        for key, value in local.items():
            if key.startswith("feedback/"):
                _, kind, bucket = key.split("/")
                getattr(dp.buckets[int(bucket)].reducer, kind)[int(bucket)] = value.to(parallelized.device())
    return saved, same_layout
