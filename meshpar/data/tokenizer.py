"""Tokenizers, through the `tokenizers` library: a Hugging Face `tokenizer.json`, a
folder holding one (a transformers model directory, or what `meshpar tokenizer train`
writes), and training a byte-level BPE on local text.

A tokenizer is known by the SHA-256 of its `tokenizer.json`: prepared data records it,
and `meshpar train --data DIR --tokenizer TOK` refuses data another tokenizer made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Names tokenizers give their end-of-text token, tried in order when none is named.
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used, with the reason."""


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("tokenizers are read by the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


@dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer, its identity, and the token that ends each document."""

    source: str  # the tokenizer.json it was read from
    json_text: str  # its contents: what worker processes rebuild it from
    sha256: str
    end_of_text: str
    end_of_text_id: int

    @property
    def backend(self):
        return tokenizer_backend(self.json_text)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id it can produce (added tokens included)."""
        backend = self.backend
        ids = list(backend.get_vocab(with_added_tokens=True).values())
        return max(ids) + 1 if ids else 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, without the special tokens a post-processor would add."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "end_of_text": self.end_of_text,
                "end_of_text_id": self.end_of_text_id}


_BACKENDS: dict[str, object] = {}


def tokenizer_backend(json_text: str):
    """The `tokenizers.Tokenizer` of a JSON text, built once per process (worker
    processes rebuild theirs from the text)."""
    if json_text not in _BACKENDS:
        _BACKENDS[json_text] = _require_tokenizers().Tokenizer.from_str(json_text)
    return _BACKENDS[json_text]


def tokenizer_file(spec: str | Path) -> Path:
    """The tokenizer.json that `spec` names: the file itself or a folder holding one."""
    path = Path(spec)
    if path.is_dir():
        path = path / FILE
        if not path.is_file():
            raise TokenizerError(f"--tokenizer {spec}: the folder holds no {FILE} (a transformers model "
                                 f"directory with a fast tokenizer has one; `meshpar tokenizer train` writes one)")
    elif not path.is_file():
        raise TokenizerError(f"--tokenizer {spec}: no such file or folder")
    return path


def tokenizer_hash(spec: str | Path) -> str:
    return hashlib.sha256(tokenizer_file(spec).read_bytes()).hexdigest()


def _configured_end_of_text(folder: Path) -> str | None:
    """The eos_token of a transformers tokenizer_config.json beside the tokenizer, if any."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (json.JSONDecodeError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(spec: str | Path, end_of_text: str | None = None) -> TextTokenizer:
    """The tokenizer at `spec` (a tokenizer.json or a folder holding one). Its end-of-text
    token: `end_of_text` when given, else a transformers folder's eos_token, else the first
    of END_OF_TEXT_NAMES it knows. TokenizerError names what is wrong."""
    path = tokenizer_file(spec)
    raw = path.read_bytes()  # hashed as stored, as tokenizer_hash() does
    json_text = raw.decode("utf-8")
    try:
        backend = tokenizer_backend(json_text)
    except Exception as err:  # the Rust side raises a plain Exception for a malformed file
        raise TokenizerError(f"--tokenizer {spec}: {path} is not a tokenizer the `tokenizers` package "
                             f"reads ({err})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    candidates = [end_of_text] if end_of_text else [_configured_end_of_text(path.parent), *END_OF_TEXT_NAMES]
    chosen = next((c for c in candidates if c and c in vocab), None)
    if chosen is None:
        special = sorted(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
        if end_of_text:
            raise TokenizerError(f"--eot {end_of_text!r} is not a token of {path}; its special tokens: "
                                 f"{', '.join(special) or 'none'}")
        raise TokenizerError(f"{path} has no end-of-text token meshpar knows ({', '.join(END_OF_TEXT_NAMES)}); "
                             f"name one with --eot (its special tokens: {', '.join(special) or 'none'})")
    return TextTokenizer(source=str(path.resolve()), json_text=json_text,
                         sha256=hashlib.sha256(raw).hexdigest(),
                         end_of_text=chosen, end_of_text_id=vocab[chosen])


def train_bpe(documents: Iterable[str], vocab_size: int, out: str | Path, min_frequency: int = 2,
              end_of_text: str = "<|endoftext|>", progress: bool = True) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (the 256 bytes, the merges, and the
    end-of-text token) on `documents`; write OUT/tokenizer.json and a
    tokenizer_config.json that transformers' AutoTokenizer reads. Returns the file."""
    tk = _require_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                     special_tokens=[end_of_text],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / FILE))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": end_of_text, "bos_token": None,
        "unk_token": None, "model_max_length": 1_000_000_000}, indent=1) + "\n")
    return out / FILE
