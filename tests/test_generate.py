"""Generation with a KV cache (meshpar/serve/): the cache changes no token (equal to
recomputing the whole sequence each step); tensor parallelism changes no token, greedy or
sampled from a seed (tp2; tp4, slow), and each rank caches 1/tp of the KV bytes;
meshpar's greedy tokens for transformers' own models are transformers' `generate`'s."""

import functools

import pytest
import torch

import meshpar
from meshpar.serve.generate import generate, greedy_generate
from meshpar.serve.sampling import SamplingRule
from test_api import in_one_process

transformers = pytest.importorskip("transformers")

PROMPTS = [list(b"hello world, "), [5], list(b"a longer prompt of several words")]
NEW_TOKENS = 24


def meshpar_llama(mesh):
    from meshpar.model import build_model
    from meshpar.model.config import model_config
    from meshpar.model.llama import init_rule
    from meshpar.parallel.llama_plan import llama_plan

    cfg = model_config("tiny")
    return meshpar.parallelize(build_model(cfg, 0, "meta"), mesh, llama_plan(cfg),
                               init=functools.partial(init_rule, cfg), seed=3)


def hf_models() -> dict:
    """Small random Llama (rope llama3) and Qwen3 (q/k norms), 4 heads over 2 KV heads."""
    from test_hf_models import hf_config

    models = {}
    for family in ("llama", "qwen3"):
        config = hf_config(family)
        config.vocab_size = 256
        torch.manual_seed(0)
        models[family] = transformers.AutoModelForCausalLM.from_config(config).eval()
    return models


RULES = {"t0.8": SamplingRule(temperature=0.8, seed=1), "k5": SamplingRule(temperature=1.0, top_k=5, seed=2),
         "p0.9": SamplingRule(temperature=1.2, top_p=0.9, seed=3),
         "k20p0.5": SamplingRule(temperature=0.7, top_k=20, top_p=0.5, seed=4)}


def generate_everything(tp: int) -> dict:
    """Every prompt's greedy tokens for meshpar's Llama and the transformers models, at
    tp; meshpar's Llama's tokens sampled by each rule; its KV cache bytes (this rank's)."""
    mesh = meshpar.init_mesh(tp=tp)
    llama = meshpar_llama(mesh).split
    out = {"meshpar": [greedy_generate(llama, p, NEW_TOKENS) for p in PROMPTS],
           "sampled": {name: generate(llama, PROMPTS[0], NEW_TOKENS, rule).tokens for name, rule in RULES.items()},
           "kv_cache_bytes": generate(llama, PROMPTS[0], NEW_TOKENS).kv_cache_bytes}
    for family, model in hf_models().items():
        parallel = meshpar.parallelize(model, mesh, meshpar.hf_plan(model))
        out[family] = [greedy_generate(parallel.split, p, NEW_TOKENS) for p in PROMPTS]
    mesh.destroy()
    return out


@pytest.fixture(scope="module")
def one_device():
    return in_one_process(generate_everything, 1)


def test_the_cache_changes_no_token(one_device):
    """Without a cache - the whole sequence recomputed for each new token - the same tokens."""
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    for prompt, cached in zip(PROMPTS, one_device["meshpar"]):
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                tokens.append(int(split.forward(torch.tensor([tokens]))[0, -1].argmax()))
        assert tokens[len(prompt):] == cached


def test_transformers_generate_gives_the_same_tokens(one_device):
    """transformers' own generate (its sdpa attention, its own cache) on the same model."""
    for family, model in hf_models().items():
        for prompt, ours in zip(PROMPTS, one_device[family]):
            with torch.no_grad():
                theirs = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        min_new_tokens=NEW_TOKENS, pad_token_id=0)
            assert theirs[0, len(prompt):].tolist() == ours, family


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])  # tp4: 22 s on 2 cores
def test_tensor_parallel_generation_gives_one_devices_tokens(worlds, one_device, tp):
    """Each rank caches its own KV heads and the next token is chosen over the split
    vocabulary (greedy and top-k without gathering the logits): every rank's tokens,
    greedy and sampled by each rule, are one device's, and its KV cache holds 1/tp of one
    device's bytes."""
    for rank, out in enumerate(worlds(tp).run(generate_everything, tp)):
        cache = out.pop("kv_cache_bytes")
        assert out == {k: v for k, v in one_device.items() if k != "kv_cache_bytes"}, f"rank {rank}"
        # the tiny model's 4 KV heads: each rank caches 4 / tp of them
        assert cache * tp == one_device["kv_cache_bytes"], (rank, cache)


def test_sampling_follows_its_rule(one_device):
    """Sampled tokens differ from greedy's and between seeds; top-k keeps to the k most
    likely tokens at every step (checked against the full logits); the same seed gives
    the same tokens again; a bad rule is refused."""
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    sampled = one_device["sampled"]
    assert all(tokens != one_device["meshpar"][0] for tokens in sampled.values())
    assert len({tuple(tokens) for tokens in sampled.values()}) == len(sampled)
    assert generate(split, PROMPTS[0], NEW_TOKENS, RULES["t0.8"]).tokens == sampled["t0.8"]
    tokens = list(PROMPTS[0])
    with torch.no_grad():
        for token in sampled["k5"]:
            top5 = split.forward(torch.tensor([tokens]))[0, -1].topk(5).indices.tolist()
            assert token in top5
            tokens.append(token)
    with pytest.raises(ValueError, match="top_p 1.5 must be in"):
        generate(split, PROMPTS[0], 2, SamplingRule(temperature=1.0, top_p=1.5))


def test_a_stop_token_ends_generation_and_is_kept(one_device):
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    expected = one_device["meshpar"][0]
    stop = expected[5]
    first = expected.index(stop)
    assert greedy_generate(split, PROMPTS[0], NEW_TOKENS, stop={stop}) == expected[:first + 1]
