"""The token streams the trainer reads: the built-in corpus, text and .bin files, and
folders prepared by `meshpar prepare-data`.

Text is read as bytes (byte-level tokens, vocabulary 256). A `.bin` file holds
pre-tokenized uint16 tokens and is memory-mapped, as is a Megatron-LM indexed dataset
(megatron.py); the last VAL_FRACTION of each is the validation split, as of a text
source. A prepared folder is memory-mapped too, and brings its own splits, dtype and
vocabulary (token_files.py).
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import numpy as np

from meshpar.data.megatron import MegatronDataError, megatron_prefix, open_megatron
from meshpar.data.token_files import TokenFileError, id_range, is_token_dir, open_token_dir

VAL_FRACTION = 0.05
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h"}
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


class DataError(ValueError):
    """A data source that cannot be used, with the reason."""


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
    """('bin' | 'text' | 'prepared' | 'megatron', files), or DataError if the path cannot be used."""
    if path is None:
        files = default_corpus_files()
        if not files:
            raise DataError("the default corpus (the Python standard library's sources) is not "
                            "on this machine; pass --data PATH")
        return "text", files
    p = Path(path)
    if (prefix := megatron_prefix(p)) is not None:
        return "megatron", [prefix]
    if not p.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if p.is_file() and p.suffix == ".bin":
        return "bin", [p]
    if is_token_dir(p) or (p / "train.bin").is_file():  # the latter: a prepared folder that lost its header
        return "prepared", [p]
    files = _text_files(p)
    if not files:
        raise DataError(f"--data {path}: the folder holds no text files "
                        f"({', '.join(sorted(TEXT_SUFFIXES))})")
    return "text", files


def _split_point(num_tokens: int) -> int:
    return num_tokens - int(num_tokens * VAL_FRACTION)


def corpus_split_sizes(path: str | None, vocab_size: int | None = None) -> tuple[int, int]:
    """(training tokens, validation tokens) of a source, read from file sizes (and, for a
    .bin or a prepared folder, checked against `vocab_size`, reading its tokens once).
    Used to validate a config."""
    kind, files = _source(path)
    if kind == "prepared":
        try:
            data = open_token_dir(files[0])
            data.check(vocab_size)
        except TokenFileError as err:
            raise DataError(str(err)) from None
        train, val = data.num_tokens("train"), data.num_tokens("validation")
        if train == 0:
            raise DataError(f"--data {path}: the training split is empty")
        return train, val
    if kind == "megatron":
        try:
            dataset = open_megatron(files[0])
        except MegatronDataError as err:
            raise DataError(str(err)) from None
        num_tokens = dataset.num_tokens
        _check_ids(path, dataset.tokens() if num_tokens else None, vocab_size)
    elif kind == "bin":
        size = files[0].stat().st_size
        if size % 2:
            raise DataError(f"--data {path}: a .bin must hold uint16 tokens, but its size "
                            f"({size} bytes) is odd")
        num_tokens = size // 2
        _check_ids(path, np.memmap(files[0], dtype=np.uint16, mode="r") if num_tokens else None, vocab_size)
    else:
        num_tokens = sum(f.stat().st_size for f in files)
    if num_tokens == 0:
        raise DataError(f"--data {path or 'default corpus'}: the data is empty")
    split = _split_point(num_tokens)
    return split, num_tokens - split


def _check_ids(path: str, tokens: np.ndarray | None, vocab_size: int | None) -> None:
    if tokens is None or vocab_size is None:
        return
    smallest, largest = id_range(tokens)
    if smallest < 0 or largest >= vocab_size:
        raise DataError(f"--data {path} holds token id {largest if largest >= vocab_size else smallest}, outside "
                        f"the model's vocabulary of {vocab_size}; set [model] vocab_size")


@functools.lru_cache(maxsize=4)
def load_tokens(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, validation tokens) as 1-D integer arrays, read-only. Cached: a
    process that trains several times (tests, benchmarks) reads the corpus once."""
    kind, files = _source(path)
    if kind == "prepared":
        data = open_token_dir(files[0])
        return data.tokens("train"), data.tokens("validation")
    if kind == "megatron":
        tokens = open_megatron(files[0]).tokens()
    elif kind == "bin":
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


def corpus_description(path: str | None) -> str:
    if path is None:
        return f"Python {sysconfig.get_python_version()} standard library sources"
    if is_token_dir(path):
        data = open_token_dir(path)
        tokenizer = Path(data.header["tokenizer"]["source"])
        return (f"{os.fspath(path)} ({data.num_tokens('train'):,} training tokens, {data.header['dtype']}, "
                f"tokenizer {tokenizer.parent.name}/{tokenizer.name})")
    return os.fspath(path)


def prepared_vocab_size(path: str | None) -> int | None:
    """The vocabulary of a prepared folder's tokenizer; None for any other source (or a
    folder that does not open: the source's check says why)."""
    if path is None or not is_token_dir(path):
        return None
    try:
        return open_token_dir(path).vocab_size
    except TokenFileError:
        return None
