"""prepare-data's throughput against a plain `tokenizers` loop, and the loader's pace
against the trainer's.

1. Tokenizing: the Python standard library's sources (one document per file, the
   built-in corpus) with a byte-level BPE trained here by `meshpar tokenizer train`'s
   code on a slice of them. `prepare_data` with 2 worker processes (each tokenizer on one
   thread; files written, offsets, header, atomic publication) against a single-process
   loop of `Tokenizer.encode_batch` over the same documents in the same chunks that only
   keeps the ids - once with the tokenizers library's own threads (its default), once on
   one thread, and once with `encode_batch_fast` (no offsets, as prepare-data's workers
   call it) on its own threads. Tokens per second of each, and the ratios.
2. Loading: `BatchLoader.next_batch` on the prepared tokens (memory-mapped uint16) at the
   tiny model's demo batch (32 x 128), against the trainer's consumption (steps per second
   of the tiny model on one rank at that batch).

    python benchmarks/prepare_data.py --megabytes 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def tokenize_loop(documents: list[str], tokenizer_json: str, chunk_bytes: int, method: str) -> int:
    """The plain baseline: `method` (encode_batch, or encode_batch_fast which skips the
    offsets) over chunks, ids kept; returns the token count."""
    from tokenizers import Tokenizer

    encode = getattr(Tokenizer.from_str(tokenizer_json), method)
    kept, chunk, size = [], [], 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= chunk_bytes:
            kept += [e.ids for e in encode(chunk, add_special_tokens=False)]
            chunk, size = [], 0
    if chunk:
        kept += [e.ids for e in encode(chunk, add_special_tokens=False)]
    return sum(len(ids) + 1 for ids in kept)  # + the end-of-text token prepare-data adds to each


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=12, help="text to tokenize (default 12 MB)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each tokenizer run; the best is kept")
    parser.add_argument("--steps", type=int, default=10, help="trainer steps timed (after 2 warm-up steps)")
    args = parser.parse_args()

    from meshpar.data.corpus import default_corpus_files, load_tokens
    from meshpar.data.documents import find_sources, read_documents
    from meshpar.data.loader import BatchLoader
    from meshpar.data.prepare import CHUNK_BYTES, prepare_data
    from meshpar.data.tokenizer import load_tokenizer, train_bpe

    files, total = [], 0
    for f in default_corpus_files():
        files.append(str(f))
        total += f.stat().st_size
        if total >= args.megabytes * 1e6:
            break
    documents = list(read_documents(find_sources(files)))
    text_mb = sum(len(d.encode()) for d in documents) / 1e6
    print(f"corpus: {len(documents):,} standard-library files, {text_mb:.1f} MB; {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        train_bpe(documents[: max(1, len(documents) // 6)], args.vocab_size, Path(tmp) / "tok", progress=False)
        tokenizer = load_tokenizer(Path(tmp) / "tok")
        print(f"tokenizer: byte-level BPE of {tokenizer.vocab_size:,} ids, trained on a sixth of the files "
              f"in {time.perf_counter() - started:.1f} s")

        loops = {"encode_batch loop, its own threads": ("encode_batch", "true"),
                 "encode_batch loop, one thread": ("encode_batch", "false"),
                 "encode_batch_fast loop, its own threads": ("encode_batch_fast", "true")}
        timings = {"prepare-data, 2 workers": []} | {name: [] for name in loops}
        tokens = None
        for round_ in range(args.rounds):
            started = time.perf_counter()
            data = prepare_data(files, tokenizer, Path(tmp) / "prepared", workers=2, force=True, progress=False)
            timings["prepare-data, 2 workers"].append(time.perf_counter() - started)
            tokens = data.num_tokens("train") + data.num_tokens("validation")
            for name, (method, parallel) in loops.items():
                os.environ["TOKENIZERS_PARALLELISM"] = parallel
                started = time.perf_counter()
                counted = tokenize_loop(documents, tokenizer.json_text, CHUNK_BYTES, method)
                timings[name].append(time.perf_counter() - started)
                assert counted == tokens, (counted, tokens)  # the same work
        os.environ.pop("TOKENIZERS_PARALLELISM")
        print(f"\ntokenizing {tokens:,} tokens (best of {args.rounds}; prepare-data includes reading the files, "
              f"which the loops were handed in memory):")
        rates = {name: tokens / min(seconds) for name, seconds in timings.items()}
        for name, rate in rates.items():
            print(f"  {name:42s} {min(timings[name]):6.2f} s  {rate:12,.0f} tokens/s")
        ours = rates["prepare-data, 2 workers"]
        for name in list(rates)[1:]:
            print(f"  prepare-data / {name}: {ours / rates[name]:.2f}x")

        train_tokens, _ = load_tokens(str(data.path))
        loader = BatchLoader(train_tokens, 128, 32, 0, 1, seed=0)
        loader.next_batch()
        started, batches = time.perf_counter(), 0
        while time.perf_counter() - started < 2.0:
            loader.next_batch()
            batches += 1
        loader_rate = batches / (time.perf_counter() - started)
        step_rate = trainer_steps_per_second(str(data.path), args.steps)
        print(f"\nloading the tiny model's batches (32 x 128 tokens, {data.header['dtype']} memory-mapped):")
        print(f"  loader  {loader_rate:10,.0f} batches/s  ({loader_rate * 32 * 128:,.0f} tokens/s)")
        print(f"  trainer {step_rate:10,.2f} steps/s    (tiny model, vocabulary {data.vocab_size:,}, one rank)")
        print(f"  the loader outpaces the trainer {loader_rate / step_rate:,.0f}x")


def trainer_steps_per_second(data: str, steps: int) -> float:
    import torch

    from meshpar.config import Config, check
    from meshpar.train.launch import build_mesh
    from meshpar.train.trainer import Trainer

    cfg = check(Config().update(data=data, global_batch_size=32, seq_len=128, steps=steps + 2, eval_every=0,
                                eval_batches=1, progress=False))
    trainer = Trainer(cfg, build_mesh(cfg), torch.device("cpu"))
    times = []
    for step in trainer.run().steps[2:]:
        times.append(step["step_time_s"])
    return 1 / statistics.median(times)


if __name__ == "__main__":
    main()
