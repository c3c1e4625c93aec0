"""Generation with a KV cache over a split model (one device or tensor parallel).

The prompt runs once (prefill), then one token per step (decode), each step feeding the
model only the new token at its position: the attention cores are KVCaches
(kv_cache.py) for the duration. Under tensor parallelism the output layer is split by
vocabulary, and the next token is chosen over it by sampling.py: greedily, or sampled with
a temperature, top-k and top-p from a seed, the same tokens in every layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from meshpar.parallel.apply import ParallelModel
from meshpar.serve.kv_cache import KVCache
from meshpar.serve.sampling import SamplingRule, choose, vocabulary_size


@dataclass
class Generation:
    """One prompt's continuation: its tokens, this rank's KV cache at the end (bytes), and
    the time of the prompt's forward (prefill) and of the tokens after it (decode)."""

    tokens: list[int]
    kv_cache_bytes: int
    prefill_s: float
    decode_s: float


@torch.no_grad()
def generate(split: ParallelModel, prompt: list[int], max_new_tokens: int, rule: SamplingRule = SamplingRule(),
             stop: set[int] | frozenset[int] = frozenset()) -> Generation:
    """The `max_new_tokens` tokens (fewer when one of `stop` comes; it is included) that
    decoding by `rule` (default greedy) appends to `prompt`. Collective over tp: every rank
    of a tp group calls it with the same prompt and rule. Not under a pipeline or context
    parallelism yet."""
    if split.pipelined or split.mesh.size("cp") > 1:
        raise ValueError("generation runs on one device or under tensor parallelism so far (no pp, no cp)")
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if rule.problems():
        raise ValueError("; ".join(rule.problems()))
    cores = split.attention_cores()
    if not cores:
        raise ValueError("generation needs the plan's `attention`: the modules whose attend(q, k, v) is the "
                         "causal attention core, where the KV cache goes")
    device = next(split.module.parameters()).device
    saved = [core.__dict__.get("attend") for core in cores]
    was_training = split.module.training
    split.module.eval()
    caches = [KVCache() for _ in cores]
    for core, cache in zip(cores, caches):
        core.attend = cache
    generator = torch.Generator().manual_seed(rule.seed)
    try:
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(len(prompt), device=device)
        generated: list[int] = []
        start = time.perf_counter()
        vocabulary = None
        while True:
            logits = split.forward(tokens, positions)[:, -1]
            vocabulary = vocabulary or vocabulary_size(split, logits)
            token = int(choose(split, logits, rule, generator, vocabulary)[0])
            if not generated:
                prefill = time.perf_counter() - start
            generated.append(token)
            if token in stop or len(generated) == max_new_tokens:
                return Generation(generated, sum(c.nbytes() for c in caches), prefill,
                                  time.perf_counter() - start - prefill)
            tokens = torch.tensor([[token]], device=device)
            positions = torch.tensor([len(prompt) + len(generated) - 1], device=device)
    finally:
        for core, attend in zip(cores, saved):
            if attend is None:
                del core.attend  # meshpar's Llama: its own method again
            else:
                core.attend = attend
        split.module.train(was_training)


def greedy_generate(split: ParallelModel, prompt: list[int], max_new_tokens: int,
                    stop: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The tokens greedy decoding appends to `prompt` (`generate` with the default rule)."""
    return generate(split, prompt, max_new_tokens, stop=stop).tokens
