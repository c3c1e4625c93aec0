"""`meshpar prepare-data`: tokenize a corpus once, in worker processes, into the token
files of token_files.py.

The main process reads documents and hands them out in chunks of about a megabyte of
text; workers encode them (each with its own copy of the tokenizer) and the main process
writes their results in the order the documents came, so the files do not depend on the
number of workers. Every `val_every`-th document goes to the validation split.

Nothing is written in place: the files grow in a hidden folder beside OUT, the header is
written last, and the folder is published as OUT only when complete (durable.py: a
rename, or an atomic exchange with an OUT being replaced); an interrupted run leaves no
folder that looks like data.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from meshpar import durable
from meshpar.data.documents import DocumentError, check_fields, find_sources, read_documents
from meshpar.data.token_files import FORMAT, HEADER, SPLITS, VERSION, TokenDir, open_token_dir, token_dtype
from meshpar.data.tokenizer import TextTokenizer, TokenizerError, load_tokenizer, tokenizer_backend

CHUNK_BYTES = 1 << 20  # text per task: large enough to amortize a task's overhead, small enough to balance
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: bounds the memory the reader can run ahead by


class PrepareError(ValueError):
    """A reason `prepare-data` cannot run or finish, for the user."""


# One worker's tokenizer and what it appends, set once per process by _start_worker.
_worker: dict = {}


def _start_worker(json_text: str, end_of_text_id: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker.update(backend=tokenizer_backend(json_text), end_of_text_id=end_of_text_id, dtype=dtype)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every text, each followed by end-of-text; each text's token count)."""
    backend = _worker["backend"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: without offsets
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=_worker["dtype"])
    start = 0
    for encoding, length in zip(encodings, lengths):
        tokens[start:start + length - 1] = encoding.ids
        tokens[start + length - 1] = _worker["end_of_text_id"]
        start += length
    return tokens, lengths


def _chunks(documents, chunk_bytes: int):
    """Lists of documents of about `chunk_bytes` of UTF-8 text each, and their size."""
    chunk, size = [], 0
    for text in documents:
        chunk.append(text)
        size += len(text.encode("utf-8")) if not text.isascii() else len(text)
        if size >= chunk_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


class _SplitWriter:
    """One split's token and offset files, appended to."""

    def __init__(self, folder: Path, split: str):
        self.tokens = open(folder / f"{split}.bin", "wb")
        self.offsets = open(folder / f"{split}.idx", "wb")
        self.num_tokens = self.num_documents = 0
        self.offsets.write(np.int64(0).tobytes())

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.write(tokens.tobytes())
        self.offsets.write((self.num_tokens + np.cumsum(lengths)).astype(np.int64).tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += len(lengths)

    def close(self) -> dict:
        for f in (self.tokens, self.offsets):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"documents": self.num_documents, "tokens": self.num_tokens}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove what earlier runs that were killed left beside OUT."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            durable.remove(partial)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PrepareError(f"--out {out} exists and is not empty; --force replaces it")


def prepare_data(inputs: list[str], tokenizer: str | TextTokenizer, out: str | Path, *, text_field: str = "text",
                 split: str | None = None, val_every: int = 20, workers: int = 2, end_of_text: str | None = None,
                 force: bool = False, progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> TokenDir:
    """Tokenize the documents of `inputs` with `tokenizer` into the folder `out`.
    PrepareError (or DocumentError/TokenizerError, both ValueErrors) names any problem;
    the inputs, the tokenizer and OUT are all checked before tokenizing starts."""
    if val_every < 0 or workers < 0:
        raise PrepareError(f"--val-every and --workers must be at least 0 (got {val_every}, {workers})")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer, end_of_text)
    sources = find_sources(inputs, split)
    check_fields(sources, text_field)
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    vocab_size = tok.vocab_size
    dtype = token_dtype(vocab_size)
    folder = out.parent / f".{out.name}.partial-{os.getpid()}"
    durable.remove(folder)
    folder.mkdir()
    pool = None
    try:
        writers = {s: _SplitWriter(folder, s) for s in SPLITS}
        init_args = (tok.json_text, tok.end_of_text_id, dtype)
        if workers > 1:
            pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
                workers, initializer=_start_worker, initargs=init_args)
        else:
            _start_worker(*init_args)
        bar = _progress_bar(progress)
        next_document, text_bytes, started = 0, 0, time.perf_counter()

        def write(result, size):
            nonlocal next_document, text_bytes
            tokens, lengths = result
            index = np.arange(next_document, next_document + len(lengths))
            validates = (index % val_every == val_every - 1) if val_every else np.zeros(len(lengths), bool)
            token_validates = np.repeat(validates, lengths)
            for name, keep, token_keep in (("train", ~validates, ~token_validates),
                                           ("validation", validates, token_validates)):
                if keep.any():
                    writers[name].write(tokens[token_keep], lengths[keep])
            next_document += len(lengths)
            text_bytes += size
            if bar is not None:
                bar.update(size)
                bar.set_postfix(documents=f"{next_document:,}",
                                tokens=f"{writers['train'].num_tokens + writers['validation'].num_tokens:,}")

        pending = collections.deque()
        for chunk, size in _chunks(read_documents(sources, text_field), chunk_bytes):
            if pool is None:
                write(_encode_chunk(chunk), size)
                continue
            pending.append((pool.apply_async(_encode_chunk, (chunk,)), size))
            while len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                result, size = pending.popleft()
                write(result.get(), size)
        while pending:
            result, size = pending.popleft()
            write(result.get(), size)
        if bar is not None:
            bar.close()
        if next_document == 0 or text_bytes == 0:
            raise PrepareError(f"the corpus is empty: {', '.join(inputs)} hold{'s' if len(inputs) == 1 else ''} "
                               f"no text")
        counts = {s: w.close() for s, w in writers.items()}
        header = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": vocab_size,
                  "tokenizer": tok.describe(), "splits": counts, "val_every": val_every,
                  "text_field": text_field, "inputs": [str(Path(i).resolve()) for i in inputs],
                  "text_bytes": text_bytes, "seconds": round(time.perf_counter() - started, 3)}
        durable.write_durably(folder / HEADER, (json.dumps(header, indent=1) + "\n").encode())
        durable.fsync_dir(folder)
        durable.publish(folder, out)  # a folder already at OUT (--force) is exchanged with it, then removed
        durable.fsync_dir(out.parent)
    except BaseException:
        if pool is not None:
            pool.terminate()
        durable.remove(folder)
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return open_token_dir(out)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="prepare-data", unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


__all__ = ["DocumentError", "PrepareError", "TokenizerError", "check_output", "prepare_data"]
