"""A checkpoint on disk: one safetensors file per rank, written atomically, read in any layout.

    SAVE_DIR/
      step-00000120/
        rank-00000.safetensors   each rank's pieces (boxes of full tensors, see regions.py)
        ...                      and its own state (RNG, error-feedback buffers)
        meta.json                step, model, layout, the run's counters, every file's size and sha256
        COMPLETE                 written last: a directory without it is not a checkpoint
      .step-00000125.tmp/        a save in progress (or killed mid-way): ignored, removed by the next save

Every rank writes its file into the temporary directory; once all have, rank 0 writes
meta.json and the marker there, and publishes the complete directory under its final
name in one rename. The same step saved again (a rerun) is exchanged with the old one in
one atomic step (Linux's renameat2 RENAME_EXCHANGE), which is then removed (durable.py). So at every
instant the newest complete checkpoint is loadable: a kill at any point of a save leaves
the newest one as it was or the new one whole. Whatever a killed save left - temporary
directories, a directory without its marker - goes at the next save. The newest `keep`
are kept. Under a multi-node run SAVE_DIR must be a filesystem every node sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from meshpar import comm, durable
from meshpar.checkpoint.regions import Box, CheckpointError, fill_box
from meshpar.mesh import ParallelMesh

FORMAT = "meshpar-checkpoint"
VERSION = 1
MARKER = "COMPLETE"
META = "meta.json"
LOCAL = "local/"  # keys of a rank's own state, meaningful only in the layout that wrote it


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _clean(root: Path):
    """What killed saves left: temporary directories, and step directories without their
    marker (written by meshpar before this publication order, or by hand)."""
    for entry in root.iterdir():
        if entry.is_dir() and (entry.name.startswith(".step-")
                               or (entry.name.startswith("step-") and not (entry / MARKER).is_file())):
            durable.remove(entry)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (a save directory), or `root` itself
    when it is one; None when there is none."""
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    found = complete_checkpoints(root)
    return found[-1] if found else None


def write_checkpoint(root: str | os.PathLike, step: int, mesh: ParallelMesh, tensors: dict[str, torch.Tensor],
                     pieces: list[dict], meta: dict, keep: int) -> Path:
    """Collective over every rank: write this rank's `tensors` (described by `pieces`)
    and, from rank 0, `meta`; publish the directory once every file is on disk."""
    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f".{step_dir_name(step)}.tmp"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clean(root)
        tmp.mkdir()
    comm.all_gather_object(mesh, None, tag="checkpoint")  # the directory exists for everyone
    name = rank_file_name(mesh.rank)
    header = {"format": FORMAT, "rank": str(mesh.rank), "pieces": json.dumps(pieces)}
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
    durable.write_durably(tmp / name, data)
    files = comm.all_gather_object(mesh, (name, len(data), hashlib.sha256(data).hexdigest()), tag="checkpoint")
    if mesh.rank == 0:
        meta = {"format": FORMAT, "version": VERSION, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **meta, "files": {n: {"bytes": size, "sha256": digest} for n, size, digest in files}}
        durable.write_durably(tmp / META, json.dumps(meta, indent=1).encode())
        durable.write_durably(tmp / MARKER, f"{step}\n".encode())
        durable.fsync_dir(tmp)
        durable.publish(tmp, final)
        durable.fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            durable.remove(old)
    comm.all_gather_object(mesh, None, tag="checkpoint")  # no rank goes on before it is published
    return final


def share_files(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """The files split among `ranks` by bytes: the largest first, each to the rank with
    the fewest bytes so far (the lowest on a tie). Every rank computes the same split."""
    shares: list[list[str]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for file in sorted(sizes, key=lambda f: (-sizes[f], f)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        shares[rank].append(file)
        load[rank] += sizes[file]
    return shares


class CheckpointReader:
    """Reads boxes of full tensors out of a complete checkpoint, whatever layout wrote
    it. Each file's size is checked on opening and its sha256 before its first read,
    unless `verify(mesh)` has checked every file already, each on one rank."""

    def __init__(self, path: str | os.PathLike):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint there (a directory with {MARKER} and {META})")
        self.path = found
        meta_path = found / META
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: not a meshpar checkpoint (format {self.meta.get('format')!r})")
        self._verified: set[str] = set()
        self.hashed_bytes = 0  # read by this process to check sha256s
        self.bytes_read = 0  # tensor bytes read by this process (the rows of saved pieces it needs)
        self._handles: dict[str, object] = {}
        # (name, kind) -> box -> [(file, key, start, stop)]
        self.index: dict[tuple[str, str], dict[Box, list]] = defaultdict(lambda: defaultdict(list))
        for file, expected in self.meta["files"].items():
            path = found / file
            size = path.stat().st_size if path.is_file() else None
            if size != expected["bytes"]:
                raise CheckpointError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the checkpoint "
                                      f"recorded {expected['bytes']} (truncated or replaced)")
            for piece in json.loads(self._open(file).metadata()["pieces"]):
                self.index[piece["name"], piece["kind"]][Box.from_json(piece["box"])].append(
                    (file, piece["key"], piece["start"], piece["stop"]))

    @property
    def step(self) -> int:
        return self.meta["step"]

    def _open(self, file: str):
        if file not in self._handles:
            path = self.path / file
            try:
                self._handles[file] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return self._handles[file]

    def _mismatch(self, file: str) -> str | None:
        """Why `file` is corrupt, or None when its sha256 is the recorded one."""
        path, digest = self.path / file, hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
                self.hashed_bytes += len(block)
        if digest.hexdigest() != self.meta["files"][file]["sha256"]:
            return f"{path}: its sha256 differs from the one recorded when it was saved (corrupt)"
        return None

    def _verify(self, file: str):
        if file in self._verified:
            return
        problem = self._mismatch(file)
        if problem:
            raise CheckpointError(problem)
        self._verified.add(file)

    def verify(self, mesh: ParallelMesh) -> None:
        """Collective over every rank of `mesh`: check every file's sha256, each file on
        one rank (the bytes shared out evenly), instead of every rank hashing each file
        it reads - loading one file into N ranks would read it N times. A corrupt file
        raises the same CheckpointError on every rank, so none goes on to a collective
        the others will never join."""
        files = self.meta["files"]
        mine = share_files({f: files[f]["bytes"] for f in files}, mesh.world_size)[mesh.rank]
        problems = [p for p in map(self._mismatch, mine) if p]
        found = [p for rank in comm.all_gather_object(mesh, problems, tag="checkpoint") for p in rank]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise CheckpointError(found[0] + more)
        self._verified.update(files)

    def has(self, name: str, kind: str) -> bool:
        return (name, kind) in self.index

    def names(self, kind: str = "param") -> list[str]:
        return sorted(name for name, k in self.index if k == kind)

    def full_shape(self, name: str, kind: str = "param") -> tuple[int, ...]:
        return next(iter(self.index[name, kind])).full_shape

    def read(self, name: str, kind: str, target: Box) -> torch.Tensor:
        """The local tensor of `target` for tensor `name` (`kind`: param, exp_avg, exp_avg_sq)."""
        if (name, kind) not in self.index:
            raise CheckpointError(f"{self.path}: holds no {kind} of {name}")
        sources = []
        for box, parts in self.index[name, kind].items():
            cut = target.overlap(box)
            if cut is None:
                continue
            numel = int(torch.tensor(box.local_shape).prod()) if box.local_shape else 1
            held = sum(stop - start for _, _, start, stop in parts)
            if held != numel:
                raise CheckpointError(f"{self.path}: the pieces of {kind} of {name} at {box.offsets} hold "
                                      f"{held} of its {numel} elements")
            sources.append(self._rows_read(box, parts, cut[1]))
        return fill_box(target, sources, f"{kind} of {name}")

    def _rows_read(self, box: Box, parts: list, wanted: tuple[slice, ...]) -> tuple[Box, torch.Tensor]:
        """The rows (first dimension) of a saved box that hold the `wanted` elements, read
        through safetensors' slices from the pieces that cover them, as (their box, values).
        A piece is a flat range of the box's row-major elements (ZeRO's ranges), so rows are
        what one slice can cut; a cut along a later dimension reads the rows whole."""
        if not box.local_shape:
            rows, row_size = slice(0, 1), 1
        else:
            rows = wanted[0]
            row_size = int(torch.tensor(box.local_shape[1:]).prod()) if len(box.local_shape) > 1 else 1
        lo, hi = rows.start * row_size, rows.stop * row_size
        values = None
        for file, key, start, stop in parts:
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            self._verify(file)
            piece = self._open(file).get_slice(key)[a - start:b - start]
            self.bytes_read += piece.numel() * piece.element_size()
            if values is None:
                values = torch.zeros(hi - lo, dtype=piece.dtype)
            values[a - lo:b - lo] = piece
        if not box.local_shape:
            return box, values
        local = (rows.stop - rows.start, *box.local_shape[1:])
        valid = (min(box.valid[0] - rows.start, local[0]), *box.valid[1:])
        offsets = (box.offsets[0] + rows.start, *box.offsets[1:])
        return Box(box.full_shape, offsets, valid, local), values

    def read_full(self, name: str, kind: str = "param") -> torch.Tensor:
        return self.read(name, kind, Box.whole(self.full_shape(name, kind)))

    def local_state(self, rank: int) -> dict[str, torch.Tensor]:
        """What rank `rank` saved of its own (RNG, error feedback), by key without the prefix."""
        file = rank_file_name(rank)
        if file not in self.meta["files"]:
            return {}
        self._verify(file)
        handle = self._open(file)
        return {key[len(LOCAL):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(LOCAL)}
