"""The single-device model: shapes, determinism, causality, rotary and GQA semantics."""

import pytest
import torch
import torch.nn.functional as F

from meshpar.model import PRESETS, build_model, model_config
from meshpar.model.llama import apply_rotary, rotary_tables


def test_presets_have_the_promised_sizes():
    tiny, small = model_config("tiny"), model_config("small")
    assert 100_000 < tiny.num_params() < 1_000_000
    assert 1_000_000 < small.num_params() < 10_000_000
    assert all(tiny.num_layers % n == 0 for n in (2, 4, 8))
    # Llama 3 parameter counts as published: 8.0B, 70.6B, 405.9B.
    assert model_config("llama3-8b").num_params() == pytest.approx(8.03e9, rel=0.01)
    assert model_config("llama3-70b").num_params() == pytest.approx(70.6e9, rel=0.01)
    assert model_config("llama3-405b").num_params() == pytest.approx(405.9e9, rel=0.01)
    for name, cfg in PRESETS.items():
        assert cfg.problems() == [], name


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_counts_the_built_model(tie):
    cfg = model_config("tiny", tie_embeddings=tie)
    model = build_model(cfg, seed=0)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert (model.output.weight is model.embedding.weight) == tie


def test_init_is_deterministic_and_per_parameter():
    a = build_model(model_config("tiny"), seed=3).state_dict()
    b = build_model(model_config("tiny"), seed=3).state_dict()
    c = build_model(model_config("tiny"), seed=4).state_dict()
    # A 2-layer model gets exactly the first two layers of the 8-layer one: a pipeline
    # stage can build only its own layers and still match the reference.
    d = build_model(model_config("tiny", num_layers=2), seed=3).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if name in d and name.endswith(("wo.weight", "w_down.weight")):
            # residual outputs are scaled by 1/sqrt(2 * num_layers): 8 layers vs 2
            torch.testing.assert_close(d[name], 2 * a[name], rtol=1e-6, atol=0)
        elif name in d:
            assert torch.equal(a[name], d[name]), name
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    assert a["layers.0.attention.wo.weight"].std() < a["layers.0.attention.wq.weight"].std()


def test_forward_shape_and_causality():
    model = build_model(model_config("tiny"), seed=0)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 32, 256)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 256
    logits_changed = model(changed)
    assert torch.equal(logits[:, :20], logits_changed[:, :20])  # the past never sees the future
    assert not torch.allclose(logits[:, 20:], logits_changed[:, 20:])


def test_positions_argument_selects_rotary_rows():
    model = build_model(model_config("tiny"), seed=0)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(tokens), model(tokens, positions=torch.arange(16)))


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(head_dim=8, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = apply_rotary(q.view(1, 1, 1, 8), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rotary(k.view(1, 1, 1, 8), cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33))
    torch.testing.assert_close(score(0, 0), (q * k).sum())


def test_grouped_query_attention_shares_kv_heads():
    model = build_model(model_config("tiny"), seed=0)
    attention = model.layers[0].attention
    q = torch.randn(2, 8, 16, 8)
    k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1),
                                              v.repeat_interleave(2, dim=1), is_causal=True)
    torch.testing.assert_close(attention.attend(q, k, v), expected)


def test_model_module_does_not_import_torch_distributed():
    import ast
    import pathlib

    import meshpar.model as model_pkg
    for path in pathlib.Path(model_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(n.startswith(("torch.distributed", "meshpar.parallel", "meshpar.comm",
                                         "meshpar.mesh")) for n in names), (path, names)


@pytest.mark.parametrize("block_elements", [37 * 200, 2 ** 25])  # many blocks (one cut mid-batch), one block
def test_cross_entropy_sum_equals_torch_in_value_and_gradient(monkeypatch, block_elements):
    from meshpar.model import loss

    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    logits = (torch.randn(3, 50, 200) * 4).requires_grad_()
    targets = torch.randint(0, 200, (3, 50))
    ours = loss.cross_entropy_sum(logits, targets)
    (ours * 0.5).backward()
    ours_grad, logits.grad = logits.grad, None
    theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    (theirs * 0.5).backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_sum_equals_the_blocks(monkeypatch, dtype):
    """The generated kernels a GPU runs (compiled here for the CPU: the same source) give
    the eager blocks' loss and gradient to round-off, in the logits' dtype, and keep
    the same tensors for backward."""
    from meshpar.model import loss
    from meshpar.train.activations import count_saved_bytes

    torch.manual_seed(0)
    logits = (torch.randn(2, 37, 300) * 4).to(dtype)
    targets = torch.randint(0, 300, (2, 37))
    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", 20 * 300)  # several blocks, one cut short
    results = []
    for fused_on in ((), ("cpu",)):
        monkeypatch.setattr(loss, "FUSED_ON", fused_on)
        x = logits.clone().requires_grad_()
        with count_saved_bytes(torch.nn.Module()) as saved:
            value = loss.cross_entropy_sum(x, targets)
        (value * 0.25).backward()
        results.append((value, x.grad, saved["bytes"]))
    (blocks, blocks_grad, blocks_saved), (fused, fused_grad, fused_saved) = results
    assert fused_grad.dtype == dtype and fused_saved == blocks_saved
    torch.testing.assert_close(fused, blocks, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_grad, blocks_grad, **({} if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)))


def test_cross_entropy_sum_keeps_16_bit_logits_and_no_fp32_copy():
    """What backward keeps: the bf16 logits (2 bytes each) and a 4-byte log-sum-exp per
    token, against the fp32 log-softmax (4 bytes per logit) of F.cross_entropy on the upcast."""
    from meshpar.model.loss import cross_entropy_sum
    from meshpar.train.activations import count_saved_bytes

    tokens, vocab = 64, 512
    logits = torch.randn(tokens, vocab).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    holder = torch.nn.Module()
    for fn, expected in ((cross_entropy_sum, 2 * tokens * vocab + 4 * tokens + 8 * tokens),
                         (lambda x, y: F.cross_entropy(x.float(), y, reduction="sum"),
                          4 * tokens * vocab + 8 * tokens + 4)):  # + nll_loss's total weight
        with count_saved_bytes(holder) as saved:
            out = fn(logits, targets)
        assert saved["bytes"] == expected
        out.backward()
        assert logits.grad.dtype == torch.bfloat16
        logits.grad = None
