"""The deterministic loader: the same batches in every layout, resumable from one integer.

It cuts a token stream into non-overlapping windows of seq_len+1 tokens, visits them in a
seeded permutation per epoch, and gives each dp rank its contiguous slice of every global
batch. Its position is the count of samples consumed, so it saves and restores exactly,
whatever the dp degree before and after.
"""

from __future__ import annotations

import numpy as np
import torch

from meshpar.data.corpus import DataError


class BatchLoader:
    """Global batches of (inputs, targets), each dp rank getting its rows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one sequence of {seq_len}+1")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rows_per_rank = global_batch_size // dp_size
        self.first_row = dp_rank * self.rows_per_rank
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        self.samples_consumed = 0
        self._order_epoch, self._order = -1, None

    def _window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return int(self._order[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (rows_per_rank, seq_len) inputs and targets of the next global batch."""
        start = self.samples_consumed + self.first_row
        rows = []
        for sample in range(start, start + self.rows_per_rank):
            offset = self._window(sample) * self.seq_len
            rows.append(np.asarray(self.tokens[offset:offset + self.seq_len + 1], dtype=np.int64))
        self.samples_consumed += self.global_batch_size
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.samples_consumed = state["samples_consumed"]
        self.seed = state["seed"]
