"""Token data: the built-in corpus, text and .bin files, and a deterministic loader.

Text is read as bytes (byte-level tokens, vocabulary 256). A `.bin` file holds
pre-tokenized uint16 tokens and is memory-mapped. Every source is one token stream whose
last VAL_FRACTION is the validation split.

The loader cuts the stream into non-overlapping windows of seq_len+1 tokens, visits them
in a seeded permutation per epoch, and gives each dp rank its contiguous slice of every
global batch. Its position is one integer, so it saves and restores exactly.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from meshpar.mesh import divisors
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config

VAL_FRACTION = 0.05
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h"}
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


class DataError(ValueError):
    """A data source that cannot be used, with the reason."""


@dataclass
class DataOptions(Section):
    """What the model reads, and in what batches."""

    data: str | None = option(None, "text file, folder of text files, or .bin of uint16 tokens "
                                    "(default: the Python standard library's sources)")
    global_batch_size: int = option(32, "sequences per optimizer step, over all dp ranks", at_least=1)
    micro_batch_size: int | None = option(None, "sequences per forward on one dp rank (default: the whole "
                                                "per-rank batch, no accumulation)", at_least=1)
    seq_len: int = option(128, "tokens per sequence", at_least=1)

    def microbatches(self, dp: int) -> int | None:
        """Micro-batches per step on each dp rank; None when the batch does not split
        (another message says why)."""
        if dp < 1 or self.global_batch_size < 1 or self.global_batch_size % dp:
            return None
        per_rank = self.global_batch_size // dp
        micro = self.micro_batch_size or per_rank
        return per_rank // micro if micro >= 1 and per_rank % micro == 0 else None

    def problems(self, cfg: Config) -> list[str]:
        dp, batch, problems = cfg.mesh.dp, self.global_batch_size, []
        if dp >= 1 and batch >= 1:
            if batch % dp:
                problems.append(f"--dp={dp} does not divide --global-batch-size={batch}; "
                                f"use a dp in {', '.join(map(str, divisors(batch)))}")
            elif (micro := self.micro_batch_size) is not None and micro >= 1 and (batch // dp) % micro:
                problems.append(f"--micro-batch-size={micro} must divide the per-rank batch "
                                f"{batch}/{dp}={batch // dp}; use one of {', '.join(map(str, divisors(batch // dp)))}")
        model = cfg.model_config()
        if model is not None and self.seq_len > model.max_seq_len:
            problems.append(f"--seq-len={self.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
        if self.seq_len >= 1:
            problems += self._source_problems(model.vocab_size if model else None)
        return problems

    def _source_problems(self, vocab_size: int | None) -> list[str]:
        try:
            train_tokens, val_tokens = corpus_split_sizes(self.data, vocab_size)
        except DataError as err:
            return [str(err)]
        source = self.data or "the default corpus"
        return [f"--seq-len={self.seq_len} is longer than {source} allows: its {split} split has {n} tokens "
                f"and needs at least seq_len+1 = {self.seq_len + 1}"
                for split, n in (("training", train_tokens), ("validation", val_tokens)) if n < self.seq_len + 1]


def default_corpus_files() -> list[Path]:
    """The Python standard library's own .py sources (not its tests, not installed
    packages), sorted, so every rank on a machine reads the same bytes."""
    return list(_stdlib_sources())


@functools.lru_cache(maxsize=1)
def _stdlib_sources() -> tuple[Path, ...]:  # listing the tree takes a noticeable fraction of a second
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(f for f in root.rglob("*.py")
                        if not _SKIPPED_STDLIB_DIRS.intersection(f.relative_to(root).parts[:-1])))


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)


def _source(path: str | None) -> tuple[str, list[Path]]:
    """('bin' | 'text', files), or DataError if the path cannot be used."""
    if path is None:
        files = default_corpus_files()
        if not files:
            raise DataError("the default corpus (the Python standard library's sources) is not "
                            "on this machine; pass --data PATH")
        return "text", files
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if p.is_file() and p.suffix == ".bin":
        return "bin", [p]
    files = _text_files(p)
    if not files:
        raise DataError(f"--data {path}: the folder holds no text files "
                        f"({', '.join(sorted(TEXT_SUFFIXES))})")
    return "text", files


def _split_point(num_tokens: int) -> int:
    return num_tokens - int(num_tokens * VAL_FRACTION)


def corpus_split_sizes(path: str | None, vocab_size: int | None = None) -> tuple[int, int]:
    """(training tokens, validation tokens) of a source, read from file sizes (and, for a
    .bin, checked against `vocab_size`). Cheap: used to validate a config."""
    kind, files = _source(path)
    if kind == "bin":
        size = files[0].stat().st_size
        if size % 2:
            raise DataError(f"--data {path}: a .bin must hold uint16 tokens, but its size "
                            f"({size} bytes) is odd")
        num_tokens = size // 2
        if num_tokens and vocab_size is not None:
            largest = int(np.memmap(files[0], dtype=np.uint16, mode="r").max())
            if largest >= vocab_size:
                raise DataError(f"--data {path} holds token id {largest}, outside the model's "
                                f"vocabulary of {vocab_size}; set [model] vocab_size")
    else:
        num_tokens = sum(f.stat().st_size for f in files)
    if num_tokens == 0:
        raise DataError(f"--data {path or 'default corpus'}: the data is empty")
    split = _split_point(num_tokens)
    return split, num_tokens - split


@functools.lru_cache(maxsize=4)
def load_tokens(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, validation tokens) as 1-D integer arrays, read-only. Cached: a
    process that trains several times (tests, benchmarks) reads the corpus once."""
    kind, files = _source(path)
    if kind == "bin":
        tokens = np.memmap(files[0], dtype=np.uint16, mode="r")
    else:
        tokens = np.empty(sum(f.stat().st_size for f in files), dtype=np.uint8)  # read in place: no second copy
        filled = 0
        for f in files:
            with open(f, "rb") as stream:
                filled += stream.readinto(memoryview(tokens)[filled:])
        tokens = tokens[:filled]
    tokens.flags.writeable = False
    split = _split_point(len(tokens))
    return tokens[:split], tokens[split:]


class BatchLoader:
    """Global batches of (inputs, targets), each dp rank getting its rows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one sequence of {seq_len}+1")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rows_per_rank = global_batch_size // dp_size
        self.first_row = dp_rank * self.rows_per_rank
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        self.samples_consumed = 0
        self._order_epoch, self._order = -1, None

    def _window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return int(self._order[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (rows_per_rank, seq_len) inputs and targets of the next global batch."""
        start = self.samples_consumed + self.first_row
        rows = []
        for sample in range(start, start + self.rows_per_rank):
            offset = self._window(sample) * self.seq_len
            rows.append(np.asarray(self.tokens[offset:offset + self.seq_len + 1], dtype=np.int64))
        self.samples_consumed += self.global_batch_size
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.samples_consumed = state["samples_consumed"]
        self.seed = state["seed"]


def corpus_description(path: str | None) -> str:
    if path is None:
        return f"Python {sysconfig.get_python_version()} standard library sources"
    return os.fspath(path)
