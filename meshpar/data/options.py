"""The data options of a run: the source, the batch sizes, the sequence length, and their
checks against the model and the files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshpar.data.corpus import DataError, corpus_split_sizes, prepared_vocab_size
from meshpar.data.token_files import TokenFileError, is_token_dir, open_token_dir
from meshpar.mesh import divisors
from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config


@dataclass
class DataOptions(Section):
    """What the model reads, and in what batches."""

    data: str | None = option(None, "a folder written by `meshpar prepare-data` (the model's vocabulary "
                                    "is then its tokenizer's), a text file, a folder of text files, a .bin "
                                    "of uint16 tokens, or a Megatron-LM indexed dataset's PREFIX (default: the "
                                    "Python standard library's sources, as bytes)")
    tokenizer: str | None = option(None, "the tokenizer (tokenizer.json or a folder holding one) that --data "
                                         "must have been prepared with: refused when its header names another")
    global_batch_size: int = option(32, "sequences per optimizer step, over all dp ranks", at_least=1)
    micro_batch_size: int | None = option(None, "sequences per forward on one dp rank (default: the whole "
                                                "per-rank batch, no accumulation)", at_least=1)
    seq_len: int = option(128, "tokens per sequence", at_least=1)

    def microbatches(self, dp: int) -> int | None:
        """Micro-batches per step on each dp rank; None when the batch does not split
        (another message says why)."""
        if dp < 1 or self.global_batch_size < 1 or self.global_batch_size % dp:
            return None
        per_rank = self.global_batch_size // dp
        micro = self.micro_batch_size or per_rank
        return per_rank // micro if micro >= 1 and per_rank % micro == 0 else None

    def problems(self, cfg: Config) -> list[str]:
        dp, batch, problems = cfg.mesh.dp, self.global_batch_size, []
        if dp >= 1 and batch >= 1:
            if batch % dp:
                problems.append(f"--dp={dp} does not divide --global-batch-size={batch}; "
                                f"use a dp in {', '.join(map(str, divisors(batch)))}")
            elif (micro := self.micro_batch_size) is not None and micro >= 1 and (batch // dp) % micro:
                problems.append(f"--micro-batch-size={micro} must divide the per-rank batch "
                                f"{batch}/{dp}={batch // dp}; use one of {', '.join(map(str, divisors(batch // dp)))}")
        model = cfg.model_config()
        if model is not None and self.seq_len > model.max_seq_len:
            problems.append(f"--seq-len={self.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
        window = cfg.model.directory().sliding_window() if cfg.model and cfg.model.directory() else None
        if window is not None and self.seq_len > window:
            problems.append(f"--seq-len={self.seq_len} exceeds the model's sliding window of {window} tokens "
                            f"(meshpar's attention is causal over the whole sequence)")
        if self.seq_len >= 1:
            problems += self._source_problems(model.vocab_size if model else None)
        directory = cfg.model.directory() if cfg.model else None
        if self.tokenizer is not None:
            problems += self._tokenizer_problems(self.tokenizer, f"--tokenizer {self.tokenizer}")
        elif directory and (directory.path / "tokenizer.json").is_file() and self.data and is_token_dir(self.data):
            # a transformers model's own tokenizer: its prepared data must be that tokenizer's
            problems += self._tokenizer_problems(str(directory.path), f"the model's tokenizer ({directory.path})")
        return problems

    def adopt_vocabulary(self, cfg: Config) -> None:
        """On prepared data, a model whose vocabulary is not set takes the data's."""
        vocab_size = prepared_vocab_size(self.data)
        if (vocab_size is not None and cfg.model is not None and cfg.model.directory() is None
                and "vocab_size" not in cfg.model.overrides):
            cfg.model.overrides["vocab_size"] = vocab_size

    def _tokenizer_problems(self, tokenizer: str, which: str) -> list[str]:
        from meshpar.data.tokenizer import TokenizerError, tokenizer_hash  # the tokenizers package: only here

        if self.data is None or not is_token_dir(self.data):
            return [f"--tokenizer checks the data a tokenizer prepared; --data {self.data or '(the default corpus)'} "
                    f"is not a folder written by `meshpar prepare-data`"]
        try:
            ours, data = tokenizer_hash(tokenizer), open_token_dir(self.data)
        except (TokenizerError, TokenFileError) as err:
            return [str(err)]
        if ours != data.tokenizer_hash:
            return [f"--data {self.data} was prepared by another tokenizer than {which}: "
                    f"the header records {data.header['tokenizer']['source']} (sha256 "
                    f"{data.tokenizer_hash[:12]}...), this one is {ours[:12]}...; prepare the data with it"]
        return []

    def _source_problems(self, vocab_size: int | None) -> list[str]:
        try:
            train_tokens, val_tokens = corpus_split_sizes(self.data, vocab_size)
        except DataError as err:
            return [str(err)]
        source = self.data or "the default corpus"
        return [f"--seq-len={self.seq_len} is longer than {source} allows: its {split} split has {n} tokens "
                f"and needs at least seq_len+1 = {self.seq_len + 1}"
                for split, n in (("training", train_tokens), ("validation", val_tokens)) if n < self.seq_len + 1]


