"""Publishing a directory of files so that a reader sees the old one or the new one whole,
never a part: each file written and synced, the directory synced, then given its final
name in one rename - or, where one of that name is already there, exchanged with it in one
atomic step (Linux's renameat2 RENAME_EXCHANGE) and the old one removed.

Checkpoints (checkpoint/store.py) and prepared token files (data/prepare.py) are published
this way. Tests stop a save at each of these operations in turn, so every filesystem
operation goes through this module's names.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rename(source: Path, target: Path) -> None:
    os.rename(source, target)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False
    where the system or the filesystem cannot (then nothing changed)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(complete: Path, final: Path) -> None:
    """Give the complete directory `complete` the name `final`: a rename, or when one of
    that name is there, an exchange and the old one removed. Where the filesystem cannot
    exchange, the old one is moved aside first: between the two renames `final` is
    missing."""
    if not final.exists():
        rename(complete, final)
    elif exchange(complete, final):
        remove(complete)  # the old one, now under the temporary name
    else:
        aside = final.with_name(f".{final.name}.old")
        rename(final, aside)
        rename(complete, final)
        remove(aside)
