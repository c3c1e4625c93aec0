"""The prepared-data format: a folder of token files that `meshpar prepare-data` writes
and `meshpar train --data DIR` memory-maps.

    DIR/header.json        what the files hold (written last: a folder without it is not data)
    DIR/train.bin          the training split's tokens, documents back to back, each ended by
    DIR/validation.bin     the tokenizer's end-of-text token; dtype from the header
    DIR/train.idx          int64 offsets: where each document starts, then the token count
    DIR/validation.idx

The header records the token dtype (uint16 when every id of the vocabulary fits, else
uint32), the vocabulary size, the tokenizer's hash and end-of-text token, and each split's
documents and tokens, so a reader checks the files against it before any rank starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "meshpar-tokens"
VERSION = 1
HEADER = "header.json"
SPLITS = ("train", "validation")
DTYPES = ("uint16", "uint32")


class TokenFileError(ValueError):
    """Prepared data that cannot be used, with the reason."""


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def id_range(tokens: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) id of a token array, read once in chunks so that a memory-mapped
    file larger than memory is streamed; (0, -1) for none."""
    parts = (tokens[i:i + chunk] for i in range(0, len(tokens), chunk))
    ranges = [(int(part.min()), int(part.max())) for part in parts]
    return (min(lo for lo, _ in ranges), max(hi for _, hi in ranges)) if ranges else (0, -1)


def is_token_dir(path: str | Path) -> bool:
    return (Path(path) / HEADER).is_file()


@dataclass(frozen=True)
class TokenDir:
    """A prepared folder, its header read and its files' sizes checked."""

    path: Path
    header: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.header["dtype"])

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def tokenizer_hash(self) -> str:
        return self.header["tokenizer"]["sha256"]

    def num_tokens(self, split: str) -> int:
        return self.header["splits"][split]["tokens"]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only (an empty array for an empty split)."""
        if not self.num_tokens(split):
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def offsets(self, split: str) -> np.ndarray:
        """Where each document of the split starts, then the split's token count."""
        return np.memmap(self.path / f"{split}.idx", dtype=np.int64, mode="r")

    def documents(self, split: str):
        """Each document's tokens, without its end-of-text token."""
        tokens, offsets = self.tokens(split), self.offsets(split)
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield tokens[start:end - 1]


    def check(self, vocab_size: int | None = None) -> None:
        """TokenFileError if an index disagrees with its tokens, or (given the model's
        `vocab_size`) the header's vocabulary or a stored id exceeds it. Reads the
        indexes and the tokens once; the header and sizes were checked on opening."""
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise TokenFileError(f"--data {self.path} was prepared with a tokenizer of {self.vocab_size:,} ids, "
                                 f"more than the model's vocabulary of {vocab_size:,}; set [model] vocab_size "
                                 f"to at least {self.vocab_size} (or leave it unset to take the data's)")
        for split in SPLITS:
            offsets = self.offsets(split)
            if offsets[0] != 0 or offsets[-1] != self.num_tokens(split) or np.any(np.diff(offsets) < 1):
                raise TokenFileError(f"--data {self.path}: {split}.idx does not match {split}.bin (the files "
                                     f"are corrupt; prepare the data again)")
            _, largest = id_range(self.tokens(split))
            if largest >= self.vocab_size:
                raise TokenFileError(f"--data {self.path}: {split}.bin holds token id {largest}, outside its "
                                     f"tokenizer's {self.vocab_size:,} (the file is corrupt; prepare it again)")


def open_token_dir(path: str | Path) -> TokenDir:
    """The prepared folder at `path`; TokenFileError, naming what is wrong, when its header
    is unreadable or a file is missing or has another size than the header says."""
    path = Path(path)
    try:
        header = json.loads((path / HEADER).read_text())
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, not {FORMAT!r}")
        if header.get("version") != VERSION:
            raise ValueError(f"version {header.get('version')!r}; this meshpar reads version {VERSION}")
        if header.get("dtype") not in DTYPES:
            raise ValueError(f"dtype {header.get('dtype')!r}, not one of {', '.join(DTYPES)}")
        counts = {split: (int(header["splits"][split]["documents"]), int(header["splits"][split]["tokens"]))
                  for split in SPLITS}
        int(header["vocab_size"]), str(header["tokenizer"]["sha256"])
    except FileNotFoundError:
        raise TokenFileError(f"--data {path}: no {HEADER}; not a folder written by `meshpar prepare-data` "
                             f"(or one it did not finish)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise TokenFileError(f"--data {path}: {HEADER} is not a valid header ({err})") from None
    data = TokenDir(path, header)
    for split, (documents, tokens) in counts.items():
        for name, expected in ((f"{split}.bin", tokens * data.dtype.itemsize), (f"{split}.idx", (documents + 1) * 8)):
            file = path / name
            if not file.is_file():
                raise TokenFileError(f"--data {path}: {name} is missing")
            if file.stat().st_size != expected:
                raise TokenFileError(f"--data {path}: {name} holds {file.stat().st_size:,} bytes where the header "
                                     f"says {expected:,} (truncated or corrupt; prepare the data again)")
    return data
