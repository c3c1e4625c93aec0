"""Greedy generation with a KV cache over a split model (one device or tensor parallel).

The prompt runs once (prefill), then one token per step (decode), each step feeding the
model only the new token at its position: the attention cores are KVCaches
(kv_cache.py) for the duration. Under tensor parallelism the output layer is split by
vocabulary; the next token is found without gathering the logits: each rank takes the
best of its own rows, and one all-gather of (score, id) pairs over tp picks the best of
all - the lowest id among equal scores, as `argmax` over the whole vocabulary would.
"""

from __future__ import annotations

import torch

from meshpar import comm
from meshpar.parallel.apply import ParallelModel
from meshpar.serve.kv_cache import KVCache


def _attention_cores(split: ParallelModel) -> list:
    import fnmatch

    pattern = split.plan.attention
    if pattern is None:
        raise ValueError("generation needs the plan's `attention`: the modules whose attend(q, k, v) is the "
                         "causal attention core, where the KV cache goes")
    return [m for n, m in split.module.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]


def next_token(split: ParallelModel, logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice for each row of `logits` (batch, this rank's vocabulary rows),
    over the whole vocabulary: (batch,) token ids, the same on every tp rank."""
    tp = split.tensor_parallel
    if tp.vocab_valid is None:
        return logits.argmax(-1)
    mine = logits[..., :tp.vocab_valid].float()  # the padded rows are no tokens
    if mine.shape[-1] == 0:
        best = torch.full(logits.shape[:-1], -torch.inf, device=logits.device)
        ids = torch.zeros(logits.shape[:-1], device=logits.device)
    else:
        best, ids = mine.max(-1)
    pairs = torch.stack([best, (ids + tp.vocab_start).float()], dim=-1)  # (batch, 2); ids exact below 2**24
    every = comm.all_gather(split.mesh, "tp", pairs[None], tag="greedy")  # (tp, batch, 2)
    scores, candidates = every[..., 0], every[..., 1]
    top = scores.max(0).values
    # Among the ranks holding the best score, the lowest id (argmax's first maximum).
    lowest = torch.where(scores == top, candidates, torch.inf).min(0).values
    return lowest.long()


@torch.no_grad()
def greedy_generate(split: ParallelModel, prompt: list[int], max_new_tokens: int,
                    stop: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The `max_new_tokens` tokens (fewer when one of `stop` comes; it is included) that
    greedy decoding appends to `prompt`. Collective over tp: every rank of a tp group
    calls it with the same prompt. Not under a pipeline or context parallelism yet."""
    if split.pipelined or split.mesh.size("cp") > 1:
        raise ValueError("generation runs on one device or under tensor parallelism so far (no pp, no cp)")
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    cores = _attention_cores(split)
    device = next(split.module.parameters()).device
    saved = [core.__dict__.get("attend") for core in cores]
    was_training = split.module.training
    split.module.eval()
    for core in cores:
        core.attend = KVCache()
    try:
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(len(prompt), device=device)
        generated: list[int] = []
        while True:
            logits = split.forward(tokens, positions)
            token = int(next_token(split, logits[:, -1])[0])
            generated.append(token)
            if token in stop or len(generated) == max_new_tokens:
                return generated
            position = len(prompt) + len(generated) - 1
            tokens = torch.tensor([[token]], device=device)
            positions = torch.tensor([position], device=device)
    finally:
        for core, attend in zip(cores, saved):
            if attend is None:
                del core.attend  # meshpar's Llama: its own method again
            else:
                core.attend = attend
        split.module.train(was_training)
