"""transformers' own causal LMs - Llama (rope type llama3), Qwen2 (q/k/v biases, tied
embeddings), Qwen3 (per-head q/k norms) and Mistral - built from small random configs and
split by `meshpar.hf_plan`: 5 steps at every layout equal one device's (losses and final
parameters), and one device through meshpar computes what transformers computes."""

import json
import subprocess
import sys

import pytest
import torch

import meshpar
from meshpar.cli import build_parser, config_from_args, main
from meshpar.config import ConfigError, check
from test_api import close, in_one_process

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
STEPS, BATCH, SEQ, VOCAB = 5, 8, 32, 128
LR = 1e-3


def hf_config(family: str):
    """A small random config of `family`: 4 layers, 4 heads over 2 KV heads."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_cache=False)
    own = {"llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32}),
           "qwen2": dict(tie_word_embeddings=True),
           "qwen3": {},
           "mistral": dict(sliding_window=64)}[family]
    return transformers.AutoConfig.for_model(family, **shape, **own)


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(hf_config(family))


def batches(dp: int, dp_rank: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        rows = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).chunk(dp)[dp_rank]
        yield rows[:, :-1], rows[:, 1:]


def train(family: str, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, microbatches: int = 2,
          save: str | None = None, load: str | None = None, **options) -> dict:
    """5 steps (or, from a checkpoint `load` saved after step 3, the last 2; with `save`,
    a checkpoint after step 3)."""
    mesh = meshpar.init_mesh(dp=dp, tp=tp, pp=pp, cp=cp)
    model = hf_model(family)
    parallel = meshpar.parallelize(model, mesh, meshpar.hf_plan(model), microbatches=microbatches, lr=LR,
                                   load=load, **options)
    losses = []
    for step, (x, y) in enumerate(batches(dp, mesh.index("dp"))):
        if step >= parallel.steps_taken:
            losses.append(parallel.step(x, y))
        if save and step == 2:
            parallel.save(f"{save}/{family}")
    out = {"losses": losses, "params": parallel.full_state()}
    mesh.destroy()
    return out


def every_family(layout: dict) -> dict:
    """`layout` for each family ("{}" in its load= path: the family's name)."""
    def of(family: str) -> dict:
        return {k: v.format(family) if k == "load" else v for k, v in layout.items()}
    return {family: train(family, **of(family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def one_device():
    return {family: in_one_process(train, family) for family in FAMILIES}


LAYOUTS = [dict(dp=2, tp=2, zero=3, sequence_parallel=True),
           dict(pp=2, tp=2, microbatches=4, schedule="1f1b"),
           dict(pp=2, tp=2, microbatches=4, schedule="zb-h1"),
           dict(dp=2, pp=2, zero=1),
           dict(dp=2, cp=2, zero=1, recompute="selective"),
           # slow (make test-all): beyond the layouts, each 2-6 s
           pytest.param(dict(pp=2, cp=2, cp_impl="all-to-all"), marks=pytest.mark.slow),
           pytest.param(dict(tp=4), marks=pytest.mark.slow),
           pytest.param(dict(dp=4, zero=2, offload=["optimizer"], recompute="full"), marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: ",".join(f"{k}={v}" for k, v in layout.items()))
def test_every_family_equals_one_device(worlds, one_device, layout):
    """Tensor and sequence parallelism with ZeRO-3, pipelines of 1F1B and zero-bubble
    with tp, dp x pp with ZeRO-1, context parallelism (ring with the attention cores
    recomputed, all-to-all in a pipeline), tp4 over 2 KV heads (each replicated on two
    ranks), ZeRO-2 with AdamW's state offloaded and every layer recomputed: each family's
    5 losses within 1e-5 of one device's, every final parameter too (test_api.close)."""
    for rank, runs in enumerate(worlds(4).run(every_family, layout)):
        for family in FAMILIES:
            close(runs[family], one_device[family], f"{family} {layout} rank {rank}")
            assert runs[family]["params"].keys() == one_device[family]["params"].keys()


TWO_RANKS = [pytest.param(dict(cp=2), marks=pytest.mark.slow),  # cp is in two layouts above
             pytest.param(dict(pp=2, microbatches=4, schedule="gpipe"), marks=pytest.mark.slow),
             pytest.param(dict(pp=2, microbatches=4, schedule="interleaved-1f1b", virtual_stages=2),
                          marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", TWO_RANKS, ids=lambda layout: ",".join(f"{k}={v}" for k, v in layout.items()))
def test_every_family_equals_one_device_on_two_ranks(worlds, one_device, layout):
    """Context parallelism alone; GPipe; the interleaved schedule, one layer per virtual
    stage."""
    for rank, runs in enumerate(worlds(2).run(every_family, layout)):
        for family in FAMILIES:
            close(runs[family], one_device[family], f"{family} {layout} rank {rank}")


@pytest.mark.slow
def test_compressed_gradients_stay_near_one_device(worlds, one_device):
    """dp2 with bf16 gradients on the wire (fp32 everywhere else): 5 losses within 1e-3
    of one device's - bf16's rounding of each gradient, not an error of the split."""
    for rank, runs in enumerate(worlds(2).run(every_family, dict(dp=2, grad_compression="bf16"))):
        for family in FAMILIES:
            torch.testing.assert_close(torch.tensor(runs[family]["losses"]),
                                       torch.tensor(one_device[family]["losses"]), rtol=1e-3, atol=0,
                                       msg=lambda m: f"{family} bf16 gradients rank {rank}: {m}")


def train_16_bits(family: str, precision: str, dp: int = 1, tp: int = 1) -> list[float]:
    return train(family, dp=dp, tp=tp, precision=precision)["losses"]


def every_family_in_16_bits_at_tp2_dp2(precision: str) -> dict:
    return {family: train_16_bits(family, precision, 2, 2) for family in FAMILIES}


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_16_bits_at_tp2_dp2_equals_one_device_in_16_bits(worlds, one_device, precision):
    """Computing in bf16 or fp16 (weights, gradients and AdamW in fp32; fp16's loss
    scaled): within 2e-3 of one device computing alike, and not what fp32 computes."""
    reference = {family: in_one_process(train_16_bits, family, precision) for family in FAMILIES}
    for rank, runs in enumerate(worlds(4).run(every_family_in_16_bits_at_tp2_dp2, precision)):
        for family in FAMILIES:
            torch.testing.assert_close(torch.tensor(runs[family]), torch.tensor(reference[family]), rtol=2e-3,
                                       atol=0, msg=lambda m: f"{family} {precision} rank {rank}: {m}")
            assert runs[family] != one_device[family]["losses"], f"{precision} computed in fp32"


def test_a_checkpoint_saved_at_tp2_pp2_resumes_at_dp2_cp2_zero3(worlds, one_device, tmp_path):
    """Saved after 3 steps at tp2 x pp2 (1F1B), loaded at dp2 x cp2 with ZeRO-3 (each
    rank reading its shard of every tensor): the last 2 steps and the final parameters
    are the uninterrupted one-device run's, for every family."""
    worlds(4).run(every_family, dict(tp=2, pp=2, microbatches=4, save=str(tmp_path)))
    for rank, runs in enumerate(worlds(4).run(every_family, dict(dp=2, cp=2, zero=3, load=str(tmp_path / "{}")))):
        for family in FAMILIES:
            close(runs[family], {"losses": one_device[family]["losses"][3:], "params": one_device[family]["params"]},
                  f"{family} resumed rank {rank}")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_device_computes_what_transformers_computes(family):
    """hf_plan routes attention through meshpar's core: the logits are transformers' own
    (its sdpa attention) within fp32 round-off; the plan splits what the family has."""
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model = hf_model(family).eval()
    model.config.use_cache = True  # as a Hub config says; training keeps no cache
    with torch.no_grad():
        before = model(tokens).logits
        plan = meshpar.hf_plan(model)
        after = model(tokens).logits
    assert model.config._attn_implementation == "meshpar" and model.config.use_cache is False
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert plan.vocab_embedding == ["model.embed_tokens"] and plan.vocab_output == "lm_head"
    assert plan.tp_regions == ["model.layers.*.mlp", "model.layers.*.self_attn"]
    assert plan.partial_grads == (["model.layers.*.self_attn.q_norm", "model.layers.*.self_attn.k_norm"]
                                  if family == "qwen3" else [])
    assert plan.pipeline.first == ["model.embed_tokens"] and plan.pipeline.last == ["model.norm", "lm_head"]


def test_what_hf_plan_cannot_split_is_refused_with_what_it_did_not_understand():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, qwen2, qwen3, mistral"):
        meshpar.hf_plan(gpt2)
    llama = hf_model("llama")
    llama.config.base_model_tp_plan = {**llama.config.base_model_tp_plan, "layers.*.mlp.gate_proj": "local_colwise"}
    with pytest.raises(ValueError, match="styles meshpar does not apply.*local_colwise"):
        meshpar.hf_plan(llama)
    dropout = hf_model("qwen3")
    dropout.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        meshpar.hf_plan(dropout)


def test_a_padding_mask_and_a_sequence_past_the_sliding_window_are_refused():
    mistral = hf_model("mistral")
    meshpar.hf_plan(mistral)
    tokens = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="65 tokens exceeds the model's sliding window of 64"):
        mistral(tokens)
    with pytest.raises(ValueError, match="without an attention_mask"):
        mistral(tokens[:, :8], attention_mask=torch.tensor([[0] + [1] * 7]))


# --- the command line: `meshpar train --model DIR`, `--init-from DIR`, `export-hf` -----------------


def meshpar_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshpar", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_a_llama3_directory_trains_split_and_exports_as_llama(tmp_path):
    """The round trip: transformers saves a small random Llama (rope type llama3) in
    several safetensors files; `meshpar train --model DIR --init-from DIR --tp 2 --pp 2`
    starts from those weights; `export-hf` writes it back in shards with an index; and
    `from_pretrained` gives the logits meshpar computes from its own checkpoint."""
    source, save, export = tmp_path / "llama", tmp_path / "run", tmp_path / "export"
    config = hf_config("llama")
    config.vocab_size = 256  # the built-in corpus's bytes
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config)
    original.save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").exists()
    out = meshpar_cli("train", "--model", source, "--init-from", source, "--tp", 2, "--pp", 2, "--steps", 2,
                      "--seq-len", 32, "--global-batch-size", 8, "--save-dir", save, "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"parameters from {source}" in out.stdout
    assert main(["checkpoint", "export-hf", str(save), str(export), "--max-shard-size", "150KB"]) == 0
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 1 and (export / "model.safetensors.index.json").exists()

    exported = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.rope_parameters["rope_type"] == "llama3"
    # Started from the saved weights and moved two steps of the warm-up (learning rates
    # 1.5e-4 and 3e-4; an AdamW step moves an element by about its learning rate), where
    # the seeded initialization would be ~0.02 away.
    for name, before in original.state_dict().items():
        assert (exported.state_dict()[name] - before).abs().max() <= 6e-4, name
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = exported(tokens).logits
    ours = in_one_process(meshpar_logits, source, save, tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def meshpar_logits(source, save, tokens) -> torch.Tensor:
    """The logits of the model meshpar saved, computed by meshpar on one device."""
    from meshpar.hf.directory import HFDirectory

    directory = HFDirectory.read(source)
    mesh = meshpar.init_mesh()
    model = directory.build()
    parallel = meshpar.parallelize(model, mesh, meshpar.hf_plan(model), load=save)
    with torch.no_grad():
        logits = parallel.split.forward(tokens)
    mesh.destroy()
    return logits


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing"], "no such directory"),
    (["--model", "{tmp}/empty"], "has no config.json"),
    (["--model", "{tmp}/gpt2"], "unknown architecture 'gpt2' (GPT2LMHeadModel); meshpar trains the transformers "
                                "families llama, qwen2, qwen3, mistral"),
    (["--model", "{tmp}/qwen3", "--tp", "3"], "--tp=3 does not divide num_heads=4"),
    (["--model", "{tmp}/qwen3", "--tp", "8"], "--tp=8 does not divide num_heads=4"),
    (["--model", "{tmp}/six-heads", "--tp", "2"], "--tp=2 and num_kv_heads=3: one must divide the other"),
    (["--model", "{tmp}/mistral", "--seq-len", "128"], "exceeds the model's sliding window of 64 tokens"),
], ids=["missing", "no-config", "gpt2", "tp3", "tp8", "kv-heads", "window"])
def test_a_directory_meshpar_cannot_train_is_refused_before_any_rank_starts(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    for family in ("qwen3", "mistral"):
        hf_config(family).save_pretrained(tmp_path / family)
    transformers.AutoConfig.for_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                      intermediate_size=192, num_hidden_layers=2).save_pretrained(tmp_path / "six-heads")
    out = meshpar_cli("train", *[a.format(tmp=tmp_path) for a in args], "--steps", 1)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "train:" not in out.stderr


def test_the_three_commands_of_the_docs_train_a_qwen_directory(tmp_path):
    """docs/transformers.md: a Qwen3 directory holding its config and tokenizer ->
    prepare-data with its tokenizer -> train it split tp2 x pp2 -> export-hf, which
    transformers loads as Qwen3. A directory whose tokenizer did not prepare the data is
    refused it."""
    model, corpus = tmp_path / "qwen", tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog "
                                                    f"{i * 7}"}) for i in range(400)))
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(model), "--no-progress"]) == 0
    config = hf_config("qwen3")
    config.vocab_size = 320
    config.save_pretrained(model)

    # The commands that start no ranks run in this process (the same entry point, less start-up).
    assert main(["prepare-data", str(corpus), "--tokenizer", str(model), "--out", str(tmp_path / "data"),
                 "--no-progress"]) == 0
    out = meshpar_cli("train", "--model", model, "--data", tmp_path / "data", "--tp", 2, "--pp", 2, "--steps", 2,
                      "--seq-len", 32, "--global-batch-size", 8, "--save-dir", tmp_path / "run", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert main(["checkpoint", "export-hf", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert type(exported).__name__ == "Qwen3ForCausalLM" and exported.config.vocab_size == 320

    # The same model with another tokenizer: the data is not its tokenizer's, refused.
    other = tmp_path / "other"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "290", "--out", str(other), "--no-progress"]) == 0
    config.save_pretrained(other)
    with pytest.raises(ConfigError, match="was prepared by another tokenizer than the model's tokenizer"):
        check(config_from_args(build_parser().parse_args(["train", "--model", str(other), "--data",
                                                          str(tmp_path / "data")])))


def test_a_directory_with_weights_starts_from_them_and_its_runs_resume_it(tmp_path):
    """`--model DIR` whose directory holds weights starts from them (as --init-from DIR);
    one with only a config starts from the seeded initialization; `--init-from RUN` of such
    a run, without --model, trains the run's transformers model again, and `generate`
    reads the run - with the directory gone too."""
    def config(*argv):
        return check(config_from_args(build_parser().parse_args(["train", *map(str, argv)])))

    weights, bare, run = tmp_path / "qwen", tmp_path / "qwen-config", tmp_path / "run"
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    bytes_config = hf_config("qwen3")
    bytes_config.vocab_size = 256  # the byte-level data's
    transformers.AutoModelForCausalLM.from_config(bytes_config).save_pretrained(weights)
    bytes_config.save_pretrained(bare)
    assert config("--model", weights).checkpoint.init_from == str(weights)
    assert config("--model", bare).checkpoint.init_from is None
    assert main(["train", "--model", str(bare), "--steps", "1", "--seq-len", "32", "--global-batch-size", "2",
                 "--data", str(tmp_path / "text.txt"), "--save-dir", str(run), "--no-progress"]) == 0
    resumed = config("--init-from", run, "--data", tmp_path / "text.txt", "--seq-len", 32)
    assert resumed.model.name == str(bare) and resumed.model.directory().family == "qwen3"
    # The run's checkpoint keeps the config.json: the directory may go, and the model with it
    # is still rebuilt - to resume from, and to generate from.
    bare.rename(tmp_path / "moved")
    assert config("--init-from", run, "--data", tmp_path / "text.txt", "--seq-len", 32).model.directory().family \
        == "qwen3"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "3"]) == 0


def test_the_dry_run_counts_a_directory_models_own_parameters(tmp_path, capsys):
    """`--dry-run` builds the transformers model on the meta device: the parameters it
    prints are the model's own count (Qwen3's q/k norms included). A config naming
    bfloat16 still builds fp32 weights."""
    config = hf_config("qwen3")
    config.vocab_size = 256
    config.dtype = "bfloat16"  # as a Hub model's config says: meshpar's weights stay fp32
    config.save_pretrained(tmp_path / "qwen")
    count = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    from meshpar.hf.directory import HFDirectory
    assert {p.dtype for p in HFDirectory.read(tmp_path / "qwen").build().parameters()} == {torch.float32}
    assert main(["train", "--model", str(tmp_path / "qwen"), "--dry-run", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert f"({count:,} parameters, vocabulary 256), 4 ranks" in out, out
