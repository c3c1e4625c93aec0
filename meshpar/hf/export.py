"""A transformers model trained through meshpar, written back as a directory of its own
family: config.json (the one it was trained from) and its weights under their own names,
in safetensors files of at most a given size - one `model.safetensors`, or numbered
shards with the `model.safetensors.index.json` that `from_pretrained` reads.

One file's tensors are read at a time: the exporter holds at most one shard.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from safetensors.torch import save_file

from meshpar.checkpoint.regions import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '200MB', '64KiB' or a byte count -> bytes; ValueError naming the units."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = (found.group(2) or "B").upper() if found else None
    if unit not in UNITS or float(found.group(1)) <= 0:
        raise ValueError(f"size {text!r}: a positive number with one of the units {', '.join(UNITS)}")
    return int(float(found.group(1)) * UNITS[unit])


def export_transformers(reader, destination: str | os.PathLike, max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write `reader`'s parameters (a checkpoint of a transformers model's run) as a
    transformers directory at `destination`; returns the weight files written."""
    raw = reader.meta["model"].get("transformers")
    if raw is None:
        raise CheckpointError(f"{reader.path}: holds no transformers model (its run's --model was a preset)")
    out = Path(destination)
    out.mkdir(parents=True, exist_ok=True)
    names = reader.names("param")
    sizes = {name: math.prod(reader.full_shape(name)) * 4 for name in names}  # written in fp32
    shards: list[list[str]] = [[]]
    filled = 0  # bytes in the last shard
    for name in names:
        if shards[-1] and filled + sizes[name] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for file, shard in zip(files, shards):
        tensors = {name: reader.read_full(name).float().contiguous() for name in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=1))
    elif (out / INDEX).exists():
        (out / INDEX).unlink()  # an index left by an earlier export would point from_pretrained at other files
    config = {k: v for k, v in raw.items() if k not in ("torch_dtype", "dtype")}
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=1))
    return [out / file for file in files]
