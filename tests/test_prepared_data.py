"""Real data: tokenizers from the `tokenizers` package, `prepare-data` on every input
format into token files, and training on them - equal to one device, resumable across
layouts - with every bad input refused before any rank starts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from meshpar.cli import main
from meshpar.config import check
from meshpar.data.corpus import load_tokens
from meshpar.data.prepare import prepare_data
from meshpar.data.token_files import open_token_dir
from meshpar.data.tokenizer import load_tokenizer
from reference import fast_config, train_and_report as train

REPO = Path(__file__).resolve().parent.parent
WORDS = ["alpha", "tensor", "pipeline", "gradient", "rank", "shard", "ünïcödé", "日本語", "émoji 🚀", "\t", "\r\n",
         "x", "  spaced  ", "<b>", "42"]


def documents(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) + rng.choice(" \n") for _ in range(rng.randint(20, 200))) for _ in range(n)]


def big_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 70,000 ids built offline: every pair of the 256 byte symbols
    (ids 0-65,535), the single bytes above them (65,536-65,791), <|endoftext|> and
    reserved tokens up to 69,999 - so a word of odd length and every document's end use
    ids beyond uint16."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [(a, b) for a in alphabet for b in alphabet]
    vocab = {a + b: i for i, (a, b) in enumerate(merges)} | {c: len(merges) + i for i, c in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"] + [f"<|reserved_{i}|>" for i in range(70_000 - len(vocab) - 1)])
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as a text folder, JSON Lines, Parquet, and saved datasets (a
    Dataset and a DatasetDict), and the 70,000-id tokenizer."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    docs = documents()
    (root / "text").mkdir()
    for i, doc in enumerate(docs):
        (root / "text" / f"doc{i:04d}.txt").write_bytes(doc.encode("utf-8"))
    with open(root / "docs.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), root / "docs.parquet", row_group_size=37)
    dataset = datasets.Dataset.from_dict({"body": docs})
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(root / "saved_dict"))
    return {"root": root, "docs": docs, "tokenizer": big_tokenizer(root / "tokenizer.json")}


@pytest.fixture(scope="module")
def prepared(corpus):
    return prepare_data([str(corpus["root"] / "docs.jsonl")], str(corpus["tokenizer"]), corpus["root"] / "prepared",
                        text_field="body", val_every=10, workers=2, progress=False)


def test_ids_beyond_uint16_round_trip_exactly(corpus, prepared):
    header = prepared.header
    assert header["dtype"] == "uint32" and header["vocab_size"] == 70_000
    assert header["splits"]["validation"]["documents"] == 12 and header["splits"]["train"]["documents"] == 108
    tokenizer = load_tokenizer(corpus["tokenizer"])
    assert header["tokenizer"]["sha256"] == tokenizer.sha256 and tokenizer.end_of_text_id == 65_792
    train_docs = [d for i, d in enumerate(corpus["docs"]) if i % 10 != 9]
    val_docs = [d for i, d in enumerate(corpus["docs"]) if i % 10 == 9]
    for split, expected in (("train", train_docs), ("validation", val_docs)):
        stored = list(prepared.documents(split))
        assert [tokenizer.decode(ids) for ids in stored] == expected
        tokens, offsets = prepared.tokens(split), prepared.offsets(split)
        assert np.all(tokens[offsets[1:] - 1] == 65_792)  # each document ends with end-of-text
    assert int(prepared.tokens("train").max()) > 65_535


@pytest.mark.parametrize("inputs, options", [
    (["text"], {}),
    (["docs.parquet"], {"text_field": "body"}),
    (["saved"], {"text_field": "body"}),
    (["saved_dict"], {"text_field": "body", "split": "train"}),
    (["docs.jsonl"], {"text_field": "body", "workers": 1, "chunk_bytes": 3000}),  # in-process, small chunks
])
def test_every_input_format_gives_identical_files(corpus, prepared, tmp_path, inputs, options):
    root = corpus["root"]
    out = prepare_data([str(root / i) for i in inputs], str(corpus["tokenizer"]), tmp_path / "out",
                       val_every=10, progress=False, **options)
    for name in ("train.bin", "train.idx", "validation.bin", "validation.idx"):
        assert (out.path / name).read_bytes() == (prepared.path / name).read_bytes(), name
    assert out.header["splits"] == prepared.header["splits"]


def layout(data: Path, steps: int = 3, **options):
    return fast_config(steps=steps, data=str(data), global_batch_size=4, seq_len=32, warmup_steps=1, **options)


def test_training_on_prepared_data_equals_one_device(worlds, prepared):
    """The 70,000-id vocabulary comes from the header; tp2 x pp2 equals one device."""
    one = check(layout(prepared.path))
    assert one.model_config().vocab_size == 70_000
    reference = train(one)
    parallel = worlds(4).run(train, check(layout(prepared.path, tp=2, pp=2, micro_batch_size=2)))[0]
    assert len(reference["losses"]) == 3
    np.testing.assert_allclose(parallel["losses"], reference["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(parallel["grad_norms"], reference["grad_norms"], rtol=1e-5, atol=0)
    for name, value in reference["params"].items():  # Adam turns a tiny gradient's rounding into lr-sized steps
        np.testing.assert_allclose(parallel["params"][name].numpy(), value.numpy(), rtol=0, atol=1e-4, err_msg=name)


def test_a_run_stopped_mid_epoch_resumes_in_another_layout(worlds, prepared, tmp_path):
    """Stopped after step 3 at tp2, resumed at dp2: the same batches as the whole run at dp2."""
    windows = (prepared.num_tokens("train") - 1) // 32
    assert windows > 6 * 4  # the whole run lies inside the first epoch: the stop is mid-epoch
    whole = worlds(2).run(train, check(layout(prepared.path, steps=6, dp=2)))[0]
    save = str(tmp_path / "ckpt")
    worlds(2).run(train, check(layout(prepared.path, steps=6, tp=2, save_dir=save, stop_after_step=3)))
    resumed = worlds(2).run(train, check(layout(prepared.path, steps=6, dp=2, save_dir=save, resume=True)))[0]
    np.testing.assert_allclose(resumed["losses"], whole["losses"][3:], rtol=0, atol=1e-5)


def test_loaded_tokens_are_the_files_memory_mapped(prepared):
    train_tokens, val_tokens = load_tokens(str(prepared.path))
    assert isinstance(train_tokens, np.memmap) and train_tokens.dtype == np.uint32
    assert len(val_tokens) == prepared.num_tokens("validation")


def test_tokenizer_train_writes_what_transformers_reads(tmp_path, capsys, corpus):
    from transformers import AutoTokenizer

    code = main(["tokenizer", "train", str(corpus["root"] / "text"), "--vocab-size", "600", "--out",
                 str(tmp_path / "tok"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ours = load_tokenizer(tmp_path / "tok")
    assert ours.end_of_text == "<|endoftext|>" and 257 <= ours.vocab_size <= 600
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = corpus["docs"][0]
    assert theirs(text)["input_ids"] == ours.encode([text])[0]
    assert theirs.eos_token_id == ours.end_of_text_id and ours.decode(ours.encode([text])[0]) == text
    theirs.eos_token = "<|reserved|>"  # a transformers directory names its end-of-text token in its config
    theirs.add_special_tokens({"additional_special_tokens": ["<|reserved|>"]})
    theirs.save_pretrained(str(tmp_path / "hf"))
    saved = load_tokenizer(tmp_path / "hf")
    assert saved.end_of_text == "<|reserved|>" and saved.end_of_text_id == theirs.convert_tokens_to_ids("<|reserved|>")


# --- bad input: a clear message and exit 2, nothing half written ------------------------


def prepare_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["prepare-data", "--no-progress", *argv])
    return code, capsys.readouterr().err


def test_prepare_data_refuses_bad_input(corpus, tmp_path, capsys):
    root, tok = corpus["root"], str(corpus["tokenizer"])
    out = tmp_path / "out"
    cases = [
        ([str(root / "docs.jsonl"), "--tokenizer", tok], "line 1 has no field 'text' (it has: id, body; choose"),
        ([str(root / "docs.parquet"), "--tokenizer", tok], "has no column 'text'; its columns: body, id"),
        ([str(root / "saved_dict"), "--tokenizer", tok, "--text-field", "body", "--split", "dev"],
         "without a split 'dev'; its splits: train, test"),
        ([str(tmp_path / "missing.txt"), "--tokenizer", tok], "no such file or folder"),
        ([str(root / "text"), "--tokenizer", str(tmp_path)], "the folder holds no tokenizer.json"),
        ([str(root / "text"), "--tokenizer", tok, "--eot", "<eos>"], "--eot '<eos>' is not a token of"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"")
    cases.append(([str(empty), "--tokenizer", tok], "the corpus is empty"))
    bad_late = tmp_path / "late.jsonl"  # the field goes missing after the first chunks were written
    bad_late.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus["docs"]) + '{"body": "x"}\n')
    cases.append(([str(bad_late), "--tokenizer", tok, "--workers", "1"], "line 121 has no field 'text'"))
    for argv, message in cases:
        code, err = prepare_cli(capsys, *argv, "--out", str(out))
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*")), argv  # nothing half written
    out.mkdir()
    (out / "x").write_text("mine")
    code, err = prepare_cli(capsys, str(root / "text"), "--tokenizer", tok, "--out", str(out))
    assert code == 2 and "exists and is not empty; --force replaces it" in err
    code, err = prepare_cli(capsys, str(root / "text"), "--tokenizer", tok, "--out", str(out), "--force")
    assert code == 0 and not (out / "x").exists() and open_token_dir(out).header["splits"]["train"]["documents"] == 114
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "late.jsonl", "out"]  # no leftovers beside it


def test_train_refuses_data_it_cannot_use(prepared, corpus, tmp_path, capsys):
    def train_cli(*argv, config: str | None = None) -> tuple[int, str]:
        extra = ["--config", config] if config else []
        code = main(["train", "--no-progress", "--seq-len", "32", "--steps", "1", *extra, *argv])
        return code, capsys.readouterr().err

    small = tmp_path / "vocab.toml"
    small.write_text("[model]\nvocab_size = 256\n")
    code, err = train_cli("--data", str(prepared.path), config=str(small))
    assert code == 2 and "a tokenizer of 70,000 ids, more than the model's vocabulary of 256" in err
    other = tmp_path / "other.json"
    big_tokenizer(other)
    other.write_text(other.read_text().replace("reserved_0|", "reserved_a|"))
    code, err = train_cli("--data", str(prepared.path), "--tokenizer", str(other))
    assert code == 2 and "was prepared by another tokenizer than --tokenizer" in err
    code, err = train_cli("--data", str(prepared.path), "--tokenizer", str(corpus["tokenizer"]), "--dry-run")
    assert code == 0, err

    def damaged(name: str, change) -> Path:
        copy = tmp_path / name
        copy.mkdir()
        for f in prepared.path.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        change(copy)
        return copy

    size = (prepared.path / "train.bin").stat().st_size
    broken = {
        "truncated": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-4]),
                      f"train.bin holds {size - 4:,} bytes where the header says {size:,} (truncated or corrupt"),
        "bad_id": (lambda d: _poke(d / "train.bin", 7, 80_000), "train.bin holds token id 80000, outside"),
        "bad_index": (lambda d: _poke(d / "validation.idx", 3, 0, np.int64), "validation.idx does not match"),
        "bad_header": (lambda d: (d / "header.json").write_text("{not json"), "header.json is not a valid header"),
        "no_header": (lambda d: (d / "header.json").unlink(), "no header.json; not a folder written by"),
    }
    for name, (change, message) in broken.items():
        code, err = train_cli("--data", str(damaged(name, change)))
        assert code == 2 and message in err, (name, err)


def _poke(file: Path, index: int, value: int, dtype=np.uint32):
    array = np.fromfile(file, dtype=dtype)
    array[index] = value
    array.tofile(file)


def test_a_killed_prepare_leaves_nothing_that_looks_complete(corpus, tmp_path):
    """SIGKILL while the token files grow: no OUT; the next run cleans the leftover and
    publishes a complete folder."""
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for doc in documents(6000, seed=1):
            f.write(json.dumps({"text": doc}) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "meshpar", "prepare-data", str(big), "--tokenizer", str(corpus["tokenizer"]),
            "--out", str(out), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in tmp_path.glob(".out.partial-*/train.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare-data ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert not out.exists() and len(leftovers) == 1 and not (leftovers[0] / "header.json").exists()
    assert subprocess.run(argv, cwd=REPO).returncode == 0
    assert not list(tmp_path.glob(".out.partial-*"))
    assert open_token_dir(out).header["splits"]["train"]["documents"] == 5700


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Megatron-Core's builder, on numpy 2
def test_megatron_indexed_datasets_read_as_one_stream(prepared, tmp_path):
    """A dataset written by Megatron-Core's own IndexedDatasetBuilder (int32 tokens, one
    sequence per document): its tokens, its vocabulary check, a truncated .bin refused."""
    import warnings

    import torch
    from meshpar.data.corpus import DataError, corpus_split_sizes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    docs = [np.append(ids, 65_792) for ids in prepared.documents("train")]
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    stream = np.concatenate(docs)
    for named in (prefix, prefix.with_suffix(".bin"), prefix.with_suffix(".idx")):
        train_tokens, val_tokens = load_tokens(str(named))
        assert train_tokens.dtype == np.int32 and np.array_equal(np.concatenate([train_tokens, val_tokens]), stream)
    assert corpus_split_sizes(str(prefix), 70_000) == (len(train_tokens), len(val_tokens))
    with pytest.raises(DataError, match="holds token id 65792, outside the model's vocabulary of 256"):
        corpus_split_sizes(str(prefix), 256)
    with open(str(prefix) + ".bin", "r+b") as f:
        f.truncate(len(stream) * 4 - 4)
    with pytest.raises(DataError, match="corpus_text_document.bin holds .* bytes where its index says"):
        corpus_split_sizes(str(prefix), 70_000)
