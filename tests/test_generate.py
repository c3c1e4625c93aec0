"""Greedy generation with a KV cache (meshpar/serve/): the cache changes no token (equal
to recomputing the whole sequence each step), tensor parallelism changes no token (tp2,
tp4 with replicated KV heads), and meshpar's tokens for transformers' own models are the
tokens transformers' `generate` gives."""

import functools

import pytest
import torch

import meshpar
from meshpar.serve.generate import greedy_generate
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


def generate_everything(tp: int) -> dict:
    """Every prompt's greedy tokens for meshpar's Llama and the transformers models, at tp."""
    mesh = meshpar.init_mesh(tp=tp)
    out = {"meshpar": [greedy_generate(meshpar_llama(mesh).split, p, NEW_TOKENS) for p in PROMPTS]}
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
    """Each rank caches its own KV heads (at tp4 the one head its query heads read,
    replicated) and the next token is chosen over the split vocabulary without gathering
    the logits: every rank's tokens are one device's."""
    for rank, out in enumerate(worlds(tp).run(generate_everything, tp)):
        assert out == one_device, f"rank {rank}"


def test_a_stop_token_ends_generation_and_is_kept(one_device):
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    expected = one_device["meshpar"][0]
    stop = expected[5]
    first = expected.index(stop)
    assert greedy_generate(split, PROMPTS[0], NEW_TOKENS, stop={stop}) == expected[:first + 1]
