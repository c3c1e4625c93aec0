"""Checkpoints: sharded, atomic saves that load into any layout, and Hugging Face interop.

    regions.py    where a rank's local tensors sit in the full ones (boxes, flat ranges)
    store.py      the on-disk format: one safetensors file per rank, published atomically
    training.py   what a trainer saves and restores
    hf.py         transformers Llama directories: export, and read as a checkpoint
    commands.py   `meshpar checkpoint info | convert | export-hf | import-hf`
"""

from __future__ import annotations

import os

from meshpar.checkpoint.regions import CheckpointError
from meshpar.checkpoint.store import CheckpointReader, latest_checkpoint


def open_checkpoint(path: str | os.PathLike, native: bool = False):
    """A reader of `path`: a meshpar checkpoint (or save directory, its newest complete
    one) or a Hugging Face directory - a Llama's, read under meshpar's model's names, or
    `native`ly, any family's under its own (a transformers model trained as it is)."""
    from meshpar.checkpoint.hf import HFReader, is_hf_directory

    return HFReader(path, native) if is_hf_directory(path) else CheckpointReader(path)


__all__ = ["CheckpointError", "CheckpointReader", "latest_checkpoint", "open_checkpoint"]
