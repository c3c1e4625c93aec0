"""Generation with a KV cache (meshpar/serve/): the cache changes no token (equal to
recomputing the whole sequence each step); tensor parallelism changes no token, greedy or
sampled from a seed (tp2; tp4, slow), and each rank caches 1/tp of the KV bytes;
meshpar's greedy tokens for transformers' own models are transformers' `generate`'s."""

import functools

import pytest
import torch

import meshpar
from meshpar.serve.generate import generate, generate_batch, greedy_generate
from meshpar.serve.sampling import SamplingRule
from test_api import in_one_process

transformers = pytest.importorskip("transformers")

PROMPTS = [list(b"hello world, "), [5], list(b"a longer prompt of several words")]
NEW_TOKENS = 64


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


def tokens(outs) -> list[list[int]]:
    return [out.tokens for out in outs]


def generate_everything(tp: int, pp: int) -> dict:
    """The prompts' greedy tokens, as one batch, for meshpar's Llama and the transformers
    models at tp x pp; meshpar's Llama's tokens sampled by each rule (one batch, a rule
    per sequence); its KV cache bytes (this rank's) for the first prompt."""
    mesh = meshpar.init_mesh(tp=tp, pp=pp)
    llama = meshpar_llama(mesh).split
    out = {"meshpar": tokens(generate_batch(llama, PROMPTS, NEW_TOKENS)),
           "sampled": tokens(generate_batch(llama, [PROMPTS[0]] * len(RULES), NEW_TOKENS, list(RULES.values()))),
           "kv_cache_bytes": generate(llama, PROMPTS[0], NEW_TOKENS).kv_cache_bytes}
    for family, model in hf_models().items():
        parallel = meshpar.parallelize(model, mesh, meshpar.hf_plan(model))
        out[family] = tokens(generate_batch(parallel.split, PROMPTS, NEW_TOKENS))
    mesh.destroy()
    return out


@pytest.fixture(scope="module")
def one_device():
    return in_one_process(generate_everything, 1, 1)


def test_the_cache_changes_no_token(one_device):
    """Without a cache - the whole sequence recomputed for each new token - the same tokens;
    one prompt at a time, the batch's tokens."""
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    for prompt, cached in zip(PROMPTS, one_device["meshpar"]):
        assert greedy_generate(split, prompt, NEW_TOKENS) == cached
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                tokens.append(int(split.forward(torch.tensor([tokens]))[0, -1].argmax()))
        assert tokens[len(prompt):] == cached


def test_transformers_generate_gives_the_same_tokens(one_device):
    """transformers' own generate (its sdpa attention, its own cache) on the same model,
    one prompt at a time: meshpar's batch gives its tokens."""
    for family, model in hf_models().items():
        for prompt, ours in zip(PROMPTS, one_device[family]):
            with torch.no_grad():
                theirs = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        min_new_tokens=NEW_TOKENS, pad_token_id=0)
            assert theirs[0, len(prompt):].tolist() == ours, family


# tp2 x pp2 in process is slow (15 s): `meshpar generate --tp 2 --pp 2` below runs that layout
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), pytest.param(2, 2, marks=pytest.mark.slow),
                                    pytest.param(4, 1, marks=pytest.mark.slow)], ids=["tp2", "pp2", "tp2xpp2", "tp4"])
def test_parallel_generation_gives_one_devices_tokens(worlds, one_device, tp, pp):
    """Each rank caches its own KV heads (tp) of its own layers (pp), the sequences decode
    in a group per stage, and the next token is chosen over the split vocabulary: every
    rank's tokens, greedy and sampled by each rule, are one device's, and its KV cache
    holds 1/(tp x pp) of one device's bytes."""
    for rank, out in enumerate(worlds(tp * pp).run(generate_everything, tp, pp)):
        cache = out.pop("kv_cache_bytes")
        assert out == {k: v for k, v in one_device.items() if k != "kv_cache_bytes"}, f"rank {rank}"
        # the tiny model's 4 KV heads of 8 layers: each rank caches 4 / tp heads of 8 / pp layers
        assert cache * tp * pp == one_device["kv_cache_bytes"], (rank, cache)


def test_sampling_follows_its_rule(one_device):
    """Sampled tokens differ from greedy's and between seeds; top-k keeps to the k most
    likely tokens at every step (checked against the full logits); the same seed gives
    the same tokens again, alone as in a batch of other rules; a bad rule is refused."""
    mesh = meshpar.ParallelMesh.single()
    split = meshpar_llama(mesh).split
    sampled = dict(zip(RULES, one_device["sampled"]))  # one batch, a rule per sequence
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


# --- `meshpar generate` ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A checkpoint of the tiny model after 3 steps at dp2 (any layout loads anywhere)."""
    from meshpar.cli import main

    save = tmp_path_factory.mktemp("generate") / "run"
    assert main(["train", "--steps", "3", "--dp", "2", "--seq-len", "64", "--save-dir", str(save),
                 "--no-progress"]) == 0
    return save


def test_generate_reads_a_checkpoint_in_any_layout(trained, capsys):
    """`meshpar generate` at tp1 and at tp2 x pp2 (the checkpoint was saved at dp2) prints
    the same continuations, which are the tokens `generate` gives from Python on the
    checkpoint's model; each of the 4 ranks holds a quarter of the KV cache."""
    import json
    import subprocess
    import sys

    from meshpar.checkpoint import open_checkpoint
    from meshpar.checkpoint.training import load_parameters
    from meshpar.cli import main

    argv = ["generate", "--checkpoint", str(trained), "--prompt", "def main(", "--prompt", "import os",
            "--max-new-tokens", "12", "--json"]
    assert main(argv) == 0
    one = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out = subprocess.run([sys.executable, "-m", "meshpar", *argv, "--tp", "2", "--pp", "2"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    four = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["tokens"] for r in four] == [r["tokens"] for r in one] and len(one) == 2
    assert [r["kv_cache_bytes_per_rank"] * 4 for r in four] == [r["kv_cache_bytes_per_rank"] for r in one]
    assert one[0]["text"] == bytes(one[0]["tokens"]).decode("utf-8", errors="replace")

    mesh = meshpar.ParallelMesh.single()
    parallel = meshpar_llama(mesh)
    load_parameters(parallel, open_checkpoint(trained))
    assert greedy_generate(parallel.split, list(b"def main("), 12) == one[0]["tokens"]


def test_generate_speaks_a_transformers_directorys_tokenizer(tmp_path, capsys, trained):
    """A Qwen3 directory with weights and a tokenizer.json: the prompt is encoded and the
    continuation decoded with it, ending at its end-of-text token, and the tokens are the
    ones transformers' generate gives from the same directory. The tokenizer's 300 ids
    given to the byte-level model are refused."""
    import json

    from meshpar.cli import main
    from meshpar.data.tokenizer import load_tokenizer
    from test_hf_models import hf_config

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {i}: the quick brown fox {i * 3}"}) for i in range(300)))
    model_dir = tmp_path / "qwen"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(model_dir),
                 "--no-progress"]) == 0
    config = hf_config("qwen3")
    config.vocab_size = 300
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    capsys.readouterr()  # what the tokenizer's training printed
    assert main(["generate", "--checkpoint", str(model_dir), "--prompt", "line 7: the quick",
                 "--max-new-tokens", "10", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer.encode(["line 7: the quick"])[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.end_of_text_id,
        pad_token_id=tokenizer.end_of_text_id)[0, len(prompt):].tolist()
    assert ours["tokens"] == theirs and ours["text"] == tokenizer.decode(theirs)
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "x", "--tokenizer", str(model_dir)]) == 2
    assert "the tokenizer's 300 ids do not fit the model's vocabulary of 256" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    ([], "no prompt: give --prompt TEXT"),
    (["--prompt", "x", "--tp", "3"], "--tp=3 does not divide num_heads=8"),
    (["--prompt", "x" * 250, "--max-new-tokens", "10"], "exceed the model's 256 positions"),
    (["--prompt", "x", "--pp", "9"], "9 pipeline stages (--pp) but only 8 layers"),
], ids=["top-p", "no-prompt", "tp3", "too-long", "pp9"])
def test_generate_refuses_what_it_cannot_do_before_any_rank_starts(trained, capsys, args, message):
    from meshpar.cli import main

    assert main(["generate", "--checkpoint", str(trained), *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_missing_checkpoint(tmp_path, capsys):
    from meshpar.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
