"""Megatron-LM's indexed datasets (`PREFIX.bin` + `PREFIX.idx`, what its
`preprocess_data.py` writes), read as one token stream.

The index, little-endian: the magic b"MMIDIDX\\x00\\x00", version (u64, 1), a dtype code
(u8), the sequence count (u64), the document count (u64), then each sequence's length
(int32), each sequence's byte offset in the .bin (int64), and the document boundaries
(int64, in sequences). The .bin holds the sequences' tokens back to back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
INTEGER_CODES = (1, 2, 3, 4, 5, 8)


class MegatronDataError(ValueError):
    pass


def megatron_prefix(path: str | Path) -> Path | None:
    """The PREFIX of a Megatron dataset `path` names (PREFIX, PREFIX.bin or PREFIX.idx),
    when PREFIX.idx starts with Megatron's magic; else None."""
    path = Path(path)
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    index = prefix.parent / (prefix.name + ".idx")
    try:
        with open(index, "rb") as f:
            return prefix if f.read(len(MAGIC)) == MAGIC else None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class MegatronDataset:
    prefix: Path
    dtype: np.dtype
    num_tokens: int
    num_documents: int

    def tokens(self) -> np.ndarray:
        return np.memmap(self.prefix.parent / (self.prefix.name + ".bin"), dtype=self.dtype, mode="r")


def open_megatron(prefix: Path) -> MegatronDataset:
    """Read and check the index of the dataset at `prefix`: MegatronDataError when it is
    not one meshpar can stream (a version or dtype it does not know, sequences not back
    to back) or the .bin has another size than the index says."""
    index, data = prefix.parent / (prefix.name + ".idx"), prefix.parent / (prefix.name + ".bin")
    raw = index.read_bytes()
    fixed = len(MAGIC) + 8 + 1 + 8 + 8
    if len(raw) < fixed:
        raise MegatronDataError(f"--data {prefix}: {index.name} is truncated ({len(raw)} bytes)")
    version, code, sequences, documents = struct.unpack_from("<QBQQ", raw, len(MAGIC))
    if version != 1:
        raise MegatronDataError(f"--data {prefix}: Megatron index version {version}; meshpar reads version 1")
    if code not in INTEGER_CODES:
        raise MegatronDataError(f"--data {prefix}: Megatron dtype code {code} is not an integer token type")
    if len(raw) < fixed + sequences * 12 + documents * 8:
        raise MegatronDataError(f"--data {prefix}: {index.name} is shorter than its {sequences:,} sequences need")
    lengths = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=fixed).astype(np.int64)
    pointers = np.frombuffer(raw, dtype=np.int64, count=sequences, offset=fixed + sequences * 4)
    dtype = np.dtype(DTYPES[code])
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize if sequences else pointers
    if not np.array_equal(pointers, expected):
        raise MegatronDataError(f"--data {prefix}: its sequences do not lie back to back in {data.name}; meshpar "
                                f"reads a dataset as one stream")
    num_tokens = int(lengths.sum())
    if not data.is_file():
        raise MegatronDataError(f"--data {prefix}: {data.name} is missing")
    if data.stat().st_size != num_tokens * dtype.itemsize:
        raise MegatronDataError(f"--data {prefix}: {data.name} holds {data.stat().st_size:,} bytes where its "
                                f"index says {num_tokens * dtype.itemsize:,} (truncated or corrupt)")
    return MegatronDataset(prefix, dtype, num_tokens, max(0, documents - 1))
