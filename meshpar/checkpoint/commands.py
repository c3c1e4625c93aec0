"""`meshpar checkpoint info | convert | export-hf`: offline, no process group."""

from __future__ import annotations

import argparse
import math
import sys

from meshpar.checkpoint import CheckpointError, open_checkpoint
from meshpar.checkpoint.regions import Box
from meshpar.checkpoint.store import write_checkpoint
from meshpar.mesh import ParallelMesh
from meshpar.model.config import ModelConfig
from meshpar.train.metrics import format_bytes

KINDS = ("param", "exp_avg", "exp_avg_sq")


def add_arguments(parser: argparse.ArgumentParser):
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="what a checkpoint holds: step, model, layout, tensors, files")
    info.add_argument("path", help="a checkpoint, a save directory (its newest complete one) or a Hugging Face "
                                   "Llama directory")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")
    convert = actions.add_parser("convert", help="write a consolidated copy (one file, full tensors) that "
                                                 "loads into any layout; from a Hugging Face directory: import it")
    convert.add_argument("source")
    convert.add_argument("destination", help="a save directory; the copy goes to DEST/step-N")
    export = actions.add_parser("export-hf", help="write a directory transformers' from_pretrained loads: "
                                                  "meshpar's Llama as a Llama, a transformers model as its family")
    export.add_argument("source")
    export.add_argument("destination")
    export.add_argument("--max-shard-size", default="5GB",
                        help="a transformers model's weights in files of at most this size, with an index when "
                             "several (default 5GB; units B, KB, MB, GB, KiB, MiB, GiB)")


def model_of(reader) -> ModelConfig:
    raw = reader.meta["model"]
    return ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})


def from_api(reader) -> bool:
    """Whether a model parallelized through the Python API (not meshpar's Llama) saved it."""
    return bool(reader.meta["model"].get("api"))


def info(reader, verify: bool) -> str:
    meta = reader.meta
    lines = [f"checkpoint {reader.path}", f"step {reader.step}"
             + (f", saved {meta['saved_at']}" if meta.get("saved_at") else "")]
    count = sum(math.prod(reader.full_shape(name)) for name in reader.names("param"))
    if from_api(reader):
        lines.append(f"model {meta['model'].get('name')} (parallelized through the Python API): "
                     f"{count:,} parameters")
    elif "transformers" in meta["model"]:
        cfg = model_of(reader)
        lines.append(f"model {meta['model'].get('name')} (transformers, {meta['model']['transformers'].get('model_type')}): "
                     f"{count:,} parameters, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads} "
                     f"(kv {cfg.num_kv_heads}), vocab {cfg.vocab_size}")
    else:
        cfg = model_of(reader)
        lines.append(f"model {meta['model'].get('name')}: {cfg.num_params():,} parameters, {cfg.num_layers} "
                     f"layers, hidden {cfg.hidden_size}, heads {cfg.num_heads} (kv {cfg.num_kv_heads}), "
                     f"vocab {cfg.vocab_size}")
    layout = meta.get("layout")
    if layout and "world_size" in layout:
        lines.append("saved by {world_size} rank(s): dp {dp} x tp {tp} x pp {pp} x cp {cp}, ZeRO-{zero}".format(**layout))
    elif layout:
        lines.append("consolidated (one file, full tensors)")
    train = meta.get("train")
    if train:
        lines.append(f"training state: optimizer step {train['optimizer_step']}"
                     + (f", data position {train['loader']['samples_consumed']} sequences, seed {train['seed']}"
                        if "loader" in train else "")
                     + (f", loss scale {train['loss_scaler']['scale']:g}" if train.get("loss_scaler") else ""))
    else:
        lines.append("parameters only (no training state)")
    if hasattr(reader, "index"):
        for kind in KINDS:
            names = reader.names(kind)
            if names:
                lines.append(f"{kind:<11} {len(names):>4} tensors")
        files = meta["files"]
        lines.append(f"{len(files)} file(s), {format_bytes(sum(f['bytes'] for f in files.values()))}")
        if verify:
            reader.verify(ParallelMesh.single())
            lines.append("every file's sha256 matches")
    return "\n".join(lines)


def convert(reader, destination: str) -> str:
    tensors, pieces = {}, []
    for kind in KINDS:
        for name in reader.names(kind):
            full = reader.read_full(name, kind)
            key = f"{name}/{kind}"
            tensors[key] = full.reshape(-1)
            pieces.append({"key": key, "name": name, "kind": kind, "box": Box.whole(full.shape).to_json(),
                           "start": 0, "stop": full.numel()})
    meta = {"model": reader.meta["model"], "layout": {"consolidated_from": reader.meta.get("layout")},
            "train": reader.meta.get("train")}
    path = write_checkpoint(destination, reader.step, ParallelMesh.single(), tensors, pieces, meta, keep=1 << 30)
    return f"wrote {path} ({len(pieces)} tensors)"


def checkpoint_command(args) -> int:
    try:
        reader = open_checkpoint(args.source if args.action != "info" else args.path)
        if args.action == "info":
            print(info(reader, args.verify))
        elif args.action == "convert":
            print(convert(reader, args.destination))
        elif from_api(reader):
            raise CheckpointError(f"{reader.path}: holds a model parallelized through the Python API; export-hf "
                                  f"writes the models of `meshpar train` only")
        elif "transformers" in reader.meta["model"]:
            from meshpar.hf.export import export_transformers, parse_size

            try:
                limit = parse_size(args.max_shard_size)
            except ValueError as err:
                raise CheckpointError(f"--max-shard-size: {err}") from None
            files = export_transformers(reader, args.destination, limit)
            family = reader.meta["model"]["transformers"].get("model_type")
            print(f"wrote {args.destination} (config.json, {len(files)} safetensors file(s)"
                  + (", model.safetensors.index.json" if len(files) > 1 else "")
                  + f"; transformers' AutoModelForCausalLM.from_pretrained loads it as {family})")
        else:
            from meshpar.checkpoint.hf import export_hf
            print(f"wrote {export_hf(reader, model_of(reader), args.destination)} "
                  f"(config.json, model.safetensors; transformers' LlamaForCausalLM.from_pretrained loads it)")
    except (CheckpointError, FileNotFoundError) as err:
        print(f"meshpar checkpoint: {err}", file=sys.stderr)
        return 1
    return 0
