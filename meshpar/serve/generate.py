"""Generation from Python: prompts in, continuations out, over a split model.

    tokens = greedy_generate(parallel.split, prompt, 64)
    outs = generate_batch(parallel.split, prompts, 64, rules=[SamplingRule(0.8, seed=1)] * len(prompts))

Collective: every rank of the mesh calls it with the same arguments, and every rank gets
the same continuations back. The prompts are prefilled one by one and decoded together
(engine.py), each sequence in its own slot of a KV cache preallocated for all of them
(kv_cache.py); under tensor parallelism each rank caches its own KV heads, under a
pipeline each stage its own layers, and the next token is chosen over the split
vocabulary by sampling.py - the same tokens in every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from meshpar.parallel.apply import ParallelModel
from meshpar.serve.engine import Engine, Request, request_problems
from meshpar.serve.sampling import SamplingRule


@dataclass
class Generation:
    """One prompt's continuation: its tokens, why it ended ("stop" or "length"), this
    rank's KV cache bytes (allocated for the whole batch), and the time of the prompt's
    forward (prefill) and of the tokens after it (decode)."""

    tokens: list[int]
    finish_reason: str
    kv_cache_bytes: int
    prefill_s: float
    decode_s: float


def generate_batch(split: ParallelModel, prompts: list[list[int]], max_new_tokens: int,
                   rules: list[SamplingRule] | None = None, stop: set[int] | frozenset[int] = frozenset(),
                   batch: int | None = None) -> list[Generation]:
    """Each prompt's continuation: up to `max_new_tokens` tokens (fewer when one of `stop`
    comes; it is included), chosen by its rule (default greedy), with up to `batch`
    sequences (default: all) decoded together."""
    rules = rules or [SamplingRule()] * len(prompts)
    if len(rules) != len(prompts):
        raise ValueError(f"{len(rules)} rules for {len(prompts)} prompts")
    requests = [Request(list(p), max_new_tokens, rule, frozenset(stop)) for p, rule in zip(prompts, rules)]
    positions = max((len(p) for p in prompts), default=0) + max_new_tokens
    problems = [p for request in requests for p in request_problems(request, positions)]
    if problems or not requests:
        raise ValueError("; ".join(problems or ["no prompt"]))
    with Engine(split, min(batch or len(prompts), len(prompts)), positions) as engine:
        if engine.driver:
            engine.run(requests)
            engine.stop()
            done = [(r.tokens, r.finish_reason, r.prefill_s, r.decode_s) for r in requests]
        else:
            engine.follow()
            done = None
        kv_bytes = engine.kv_cache_bytes()
    if split.mesh.world_size > 1:  # the driver's results to every rank
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return [Generation(tokens, reason, kv_bytes, prefill, decode) for tokens, reason, prefill, decode in done]


def generate(split: ParallelModel, prompt: list[int], max_new_tokens: int, rule: SamplingRule = SamplingRule(),
             stop: set[int] | frozenset[int] = frozenset()) -> Generation:
    """One prompt's continuation (`generate_batch` of one)."""
    return generate_batch(split, [prompt], max_new_tokens, [rule], stop)[0]


def greedy_generate(split: ParallelModel, prompt: list[int], max_new_tokens: int,
                    stop: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The tokens greedy decoding appends to `prompt`."""
    return generate(split, prompt, max_new_tokens, stop=stop).tokens
