"""Corpus sources, the train/validation split and the deterministic dp loader."""

import numpy as np
import pytest
import torch

from meshpar.data.corpus import VAL_FRACTION, DataError, corpus_split_sizes, default_corpus_files, load_tokens
from meshpar.data.loader import BatchLoader


def test_default_corpus_is_the_standard_library():
    files = default_corpus_files()
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    train, val = load_tokens(None)
    assert (len(train), len(val)) == corpus_split_sizes(None)
    assert len(val) == int((len(train) + len(val)) * VAL_FRACTION)
    assert train.dtype == np.uint8 and len(train) > 1_000_000


def test_text_file_folder_and_bin(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "b.md").write_bytes(b"b" * 100)
    (tmp_path / "skip.png").write_bytes(b"x" * 50)
    train, val = load_tokens(str(tmp_path))
    assert len(train) + len(val) == 200 and len(val) == 10
    assert bytes(val) == b"b" * 10  # files concatenate in sorted order; the tail validates

    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "tokens.bin")
    train, val = load_tokens(str(tmp_path / "tokens.bin"))
    assert len(train) == 950 and int(val[0]) == 950
    assert corpus_split_sizes(str(tmp_path / "tokens.bin"), vocab_size=1000) == (950, 50)
    with pytest.raises(DataError, match="token id 999, outside the model's vocabulary of 256"):
        corpus_split_sizes(str(tmp_path / "tokens.bin"), vocab_size=256)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "no such file or folder"),
    (lambda p: (p / "empty.txt").write_bytes(b"") and None or p / "empty.txt", "the data is empty"),
    (lambda p: (p / "odd.bin").write_bytes(b"abc") and None or p / "odd.bin", "size \\(3 bytes\\) is odd"),
    (lambda p: (p / "d").mkdir() or p / "d", "holds no text files"),
])
def test_unusable_sources(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        corpus_split_sizes(str(make(tmp_path)))


def make_loader(tokens, dp_rank=0, dp_size=1, batch=8, seq=10, seed=0):
    return BatchLoader(tokens, seq, batch, dp_rank, dp_size, seed)


def test_dp_ranks_split_each_global_batch():
    tokens = np.arange(5000) % 256
    full = make_loader(tokens)
    shards = [make_loader(tokens, r, 4) for r in range(4)]
    for _ in range(3):
        x, y = full.next_batch()
        parts = [s.next_batch() for s in shards]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_windows_cover_an_epoch_once_then_reshuffle():
    tokens = np.arange(101)  # 10 windows of 10+1 tokens
    loader = make_loader(tokens, batch=5)
    starts = [int(x[i, 0]) for _ in range(2) for x in [loader.next_batch()[0]] for i in range(5)]
    assert sorted(starts) == list(range(0, 100, 10))
    next_epoch = [int(x[i, 0]) for _ in range(2) for x in [loader.next_batch()[0]] for i in range(5)]
    assert sorted(next_epoch) == sorted(starts) and next_epoch != starts


def test_state_dict_resumes_exactly():
    tokens = np.arange(5000) % 256
    a = make_loader(tokens, seed=7)
    for _ in range(5):
        a.next_batch()
    b = make_loader(tokens, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
