"""Choosing the next token from logits split over tp by vocabulary, the same in every layout.

Sampling is done as a perturbed argmax (the Gumbel-max trick): adding independent Gumbel
noise g_j = -log(-log(u_j)) to each token's logit / temperature and taking the best is a
draw from softmax(logits / temperature). The noise is drawn for the whole vocabulary from
the request's seeded generator on every rank - the same numbers whatever the layout - and
each rank adds its own rows' share, so a seed gives the same tokens on one device and at
any tp. The best is then found as greedy decoding finds it: the best of each rank's rows,
one all-gather of (score, id) pairs.

    top-k    the k largest logits stay: each rank's k largest, gathered (k x tp values),
             give the k-th largest of all (ties at it stay too)
    top-p    the smallest set of the most likely tokens whose probability reaches p stays:
             it needs the whole distribution, so the last position's logits are gathered
             over tp (one row of the vocabulary per sequence)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshpar import comm
from meshpar.parallel.apply import ParallelModel


@dataclass(frozen=True)
class SamplingRule:
    """temperature 0: greedy; top_k 0 and top_p 1: no truncation. The seed starts the
    sequence's own generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        found = []
        if self.temperature < 0:
            found.append(f"temperature {self.temperature} must be at least 0 (0: greedy)")
        if self.top_k < 0:
            found.append(f"top_k {self.top_k} must be at least 0 (0: off)")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p {self.top_p} must be in (0, 1] (1: off)")
        return found


def _local_rows(split: ParallelModel, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's real vocabulary rows of `logits` (batch, rows) in fp32, and the id of
    the first."""
    tp = split.tensor_parallel
    if tp.vocab_valid is None:
        return logits.float(), 0
    return logits[..., :tp.vocab_valid].float(), tp.vocab_start


def best_token(split: ParallelModel, scores: torch.Tensor, first_id: int) -> torch.Tensor:
    """(batch,) the id of the best score over the whole vocabulary, given this rank's
    `scores` for ids first_id.. (-inf where excluded): the lowest id among equal bests, as
    argmax over the whole vocabulary. Collective over tp."""
    if scores.shape[-1] == 0:
        best = torch.full(scores.shape[:-1], -torch.inf, device=scores.device)
        ids = torch.zeros(scores.shape[:-1], device=scores.device)
    else:
        best, ids = scores.max(-1)
    if split.tensor_parallel.vocab_valid is None:
        return ids.long()
    pairs = torch.stack([best, (ids + first_id).float()], dim=-1)  # ids exact below 2**24
    every = comm.all_gather(split.mesh, "tp", pairs[None], tag="next_token")  # (tp, batch, 2)
    scores_all, candidates = every[..., 0], every[..., 1]
    top = scores_all.max(0).values
    return torch.where(scores_all == top, candidates, torch.inf).min(0).values.long()


def _kth_largest(split: ParallelModel, local: torch.Tensor, k: int) -> torch.Tensor:
    """(batch, 1) the k-th largest logit over the whole vocabulary."""
    mine = local.topk(min(k, local.shape[-1]), dim=-1).values if local.shape[-1] else local
    if mine.shape[-1] < k:  # fewer rows here than k: pad so every rank sends k values
        mine = torch.cat([mine, mine.new_full((*mine.shape[:-1], k - mine.shape[-1]), -torch.inf)], -1)
    if split.tensor_parallel.vocab_valid is not None:
        mine = comm.all_gather(split.mesh, "tp", mine[None], tag="top_k")  # (tp, batch, k)
        mine = mine.permute(1, 0, 2).reshape(mine.shape[1], -1)
    return mine.topk(k, dim=-1).values[..., -1:]


def choose(split: ParallelModel, logits: torch.Tensor, rules: list[SamplingRule],
           generators: list[torch.Generator | None], vocabulary: int) -> torch.Tensor:
    """(batch,) the next tokens for the last position's `logits` (batch, this rank's
    vocabulary rows), row i by `rules[i]` drawing from `generators[i]` (the same on every
    rank; None for greedy). Collective over tp: rows of one rule are chosen together, in
    the order the rules first appear, which every rank of the group sees alike."""
    chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    kinds = [(r.temperature, r.top_k, r.top_p) for r in rules]  # the seed is in the generator
    for kind in dict.fromkeys(kinds):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        rule = rules[rows[0]]
        picked = _choose(split, logits[rows], rule, [generators[i] for i in rows], vocabulary)
        chosen[rows] = picked.to(chosen.device)
    return chosen


def _choose(split: ParallelModel, logits: torch.Tensor, rule: SamplingRule, generators: list,
            vocabulary: int) -> torch.Tensor:
    local, first = _local_rows(split, logits)
    if rule.temperature == 0:
        return best_token(split, local, first)
    scores = local / rule.temperature
    if rule.top_k:
        scores = scores.masked_fill(local < _kth_largest(split, local, rule.top_k), -torch.inf)
    if rule.top_p < 1:
        whole = _gathered(split, logits, vocabulary)
        if rule.top_k:  # truncated by k first, then by p over what is left
            kth = whole.topk(min(rule.top_k, vocabulary), dim=-1).values[..., -1:]
            whole = whole.masked_fill(whole < kth, -torch.inf)
        probs = torch.softmax(whole / rule.temperature, -1)
        ordered, order = probs.sort(dim=-1, descending=True, stable=True)
        keep_sorted = ordered.cumsum(-1) - ordered < rule.top_p  # the most likely token always stays
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep[:, first:first + local.shape[-1]], -torch.inf)
    # each sequence's noise from its own generator: its tokens do not depend on its batch
    uniform = torch.cat([torch.rand((1, vocabulary), generator=g, dtype=torch.float64) for g in generators])
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300))).to(scores.device, torch.float32)
    return best_token(split, scores + gumbel[:, first:first + local.shape[-1]], first)


def _gathered(split: ParallelModel, logits: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """(batch, vocabulary) logits gathered over tp, the padded rows dropped."""
    tp = split.tensor_parallel
    if tp.vocab_valid is None:
        return logits.float()[:, :vocabulary]
    parts = comm.all_gather(split.mesh, "tp", logits.float()[None], tag="top_p")  # (tp, batch, rows)
    return parts.permute(1, 0, 2).reshape(logits.shape[0], -1)[:, :vocabulary]


def vocabulary_size(split: ParallelModel, logits: torch.Tensor) -> int:
    """The real vocabulary (the split output layer's rows without padding). Collective over tp."""
    tp = split.tensor_parallel
    if tp.vocab_valid is None:
        return logits.shape[-1]
    count = torch.tensor([float(tp.vocab_valid)], device=logits.device)
    comm.all_reduce(split.mesh, "tp", count, tag="vocabulary")
    return int(count.item())
