"""Tensor and sequence parallelism against the single-device reference: logits, loss,
every gathered gradient, 20 training steps, the ledger's TP volume and dropout masks."""

import pytest
import torch
import torch.nn.functional as F

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.apply import split_model
from meshpar.parallel.sharding import ShardSpec, gather_full
from reference import fast_config, train_and_report

REL = 1e-5
BATCH, SEQ = 2, 32
# kv heads fewer than tp (replicated), and a vocabulary tp does not divide (padded)
GQA_PADDED = {"num_kv_heads": 1, "vocab_size": 258}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def forward_backward_errors(shape: dict, sequence_parallel: bool, overrides: dict, dropout: float = 0.0,
                            loss_block_elements: int | None = None, fused_loss: bool = False):
    """On one rank: the parallel model's logits, loss and gathered gradients against the
    reference computed on the same rank, for one micro-batch; plus the ledger.
    `loss_block_elements`: the loss's block size (default: one block at these sizes);
    `fused_loss`: the loss's generated kernels, as on a GPU, compiled for the CPU."""
    from meshpar.model import loss

    default_block, default_fused_on = loss.BLOCK_ELEMENTS, loss.FUSED_ON
    loss.BLOCK_ELEMENTS = loss_block_elements or default_block
    loss.FUSED_ON = ("cpu",) if fused_loss else default_fused_on
    try:
        result = _forward_backward_errors(shape, sequence_parallel, overrides, dropout)
        assert not (fused_loss and loss._fusion_failed), loss._fusion_failed  # no fallback to blocks
        return result
    finally:
        loss.BLOCK_ELEMENTS, loss.FUSED_ON = default_block, default_fused_on


def _forward_backward_errors(shape: dict, sequence_parallel: bool, overrides: dict, dropout: float):
    mesh = ParallelMesh.build(MeshShape(**shape))
    cfg = model_config("tiny", dropout=dropout, **overrides)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    reference = build_model(cfg, seed=0)
    torch.manual_seed(7)  # the dropout masks
    ref_logits = reference(x)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
    ref_loss.backward()

    parallel = split_model(build_model(cfg, seed=0), mesh, sequence_parallel=sequence_parallel)
    mesh.ledger.reset()
    torch.manual_seed(7)
    logits_local = parallel.module(x)
    loss = parallel.loss_sum(logits_local, y) / y.numel()
    loss.backward()
    ledger = dict(mesh.ledger.entries)
    parallel.sync_grads()

    t = mesh.size("tp")
    logits = gather_full(logits_local, ShardSpec.even("tp", 2, cfg.vocab_size, t), mesh)
    grads = parallel.full_state(grads=True)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    return {
        "logits": rel_err(logits, ref_logits.detach()),
        "loss": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
        "grads": {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads},
        "ledger": ledger,
    }


CASES_2 = [({"tp": 2}, False, {}), ({"tp": 2}, True, {}), ({"tp": 2}, True, GQA_PADDED),
           # the vocab-parallel loss's fused kernels, full slices and a padded one
           ({"tp": 2}, False, {}, 0.0, None, True), ({"tp": 2}, True, {"num_kv_heads": 1, "vocab_size": 257}, 0.0, None, True)]
CASES_4 = [({"tp": 4}, False, {}), ({"tp": 4}, True, {}), ({"tp": 4}, False, GQA_PADDED),
           ({"tp": 4}, True, {"num_kv_heads": 2, "vocab_size": 258}),
           ({"tp": 2, "dp": 2}, False, {}), ({"tp": 2, "dp": 2}, True, GQA_PADDED),
           ({"tp": 4}, False, GQA_PADDED, 0.0, 65 * 5)]  # the loss in blocks of 5 rows, the last one short


def run_cases(cases):
    return [forward_backward_errors(*case) for case in cases]


@pytest.mark.parametrize("world_size, cases", [(2, CASES_2), (4, CASES_4)])
def test_forward_backward_equals_single_device(worlds, world_size, cases):
    per_rank = worlds(world_size).run(run_cases, cases)
    for rank, results in enumerate(per_rank):
        for case, result in zip(cases, results):
            where = f"rank {rank}, {case}"
            assert result["logits"] <= REL, where
            assert result["loss"] <= REL, where
            worst = max(result["grads"].items(), key=lambda kv: kv[1])
            assert worst[1] <= REL, f"{where}: gradient of {worst[0]} off by {worst[1]:.2e}"


def test_dropout_masks_match_under_tp_and_sp(worlds):
    cases = [({"tp": 2}, False, {}, 0.1), ({"tp": 2}, True, {}, 0.1)]
    for results in worlds(2).run(run_cases, cases):
        for result in results:
            assert result["loss"] <= REL and result["logits"] <= REL
            assert max(result["grads"].values()) <= REL


def test_ledger_shows_the_analytic_tp_volume(worlds):
    """Per layer and micro-batch: 2 all-reduces of b*s*h forward and 2 backward; plus the
    embedding's forward reduction and the output layer's backward one; the loss reduces
    three (b*s,) tensors in two calls. With SP the same wire bytes move as all-gathers and reduce-scatters."""
    cfg = model_config("tiny")
    L, h = cfg.num_layers, cfg.hidden_size
    activation_bytes = BATCH * SEQ * h * 4
    plain, sp = worlds(2).run(run_cases, [({"tp": 2}, False, {}), ({"tp": 2}, True, {})])[0]

    tp_all_reduce = plain["ledger"][("tp", "all_reduce", "tp")]
    assert tp_all_reduce.calls == 4 * L + 2
    assert tp_all_reduce.bytes == (4 * L + 2) * activation_bytes
    loss = plain["ledger"][("tp", "all_reduce", "loss")]
    assert (loss.calls, loss.bytes) == (2, 3 * BATCH * SEQ * 4)  # max; then target logit + sum exp
    assert {k for k in plain["ledger"] if k[0] == "tp"} == {("tp", "all_reduce", "tp"), ("tp", "all_reduce", "loss")}

    gathers = sp["ledger"][("tp", "all_gather", "tp")]
    scatters = sp["ledger"][("tp", "reduce_scatter", "tp")]
    assert gathers.calls == scatters.calls == 4 * L + 2
    assert gathers.bytes == scatters.bytes == (4 * L + 2) * activation_bytes
    assert gathers.wire_bytes + scatters.wire_bytes == pytest.approx(tp_all_reduce.wire_bytes)
    assert ("tp", "all_reduce", "tp") not in sp["ledger"]


def bf16_ledger(sequence_parallel: bool) -> dict:
    """One forward and backward of the tiny model at tp=2 under bf16 autocast: the ledger."""
    from meshpar.parallel.precision import autocast
    mesh = ParallelMesh.build(MeshShape(tp=2))
    cfg = model_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    parallel = split_model(build_model(cfg, seed=0), mesh, sequence_parallel=sequence_parallel)
    mesh.ledger.reset()
    with autocast("bf16", torch.device("cpu")):
        logits = parallel.module(tokens[:, :-1])
    (parallel.loss_sum(logits, tokens[:, 1:]) / SEQ).backward()
    return dict(mesh.ledger.entries)


def test_sequence_parallel_moves_16_bit_activations_under_bf16(worlds):
    """bf16, tp=2 with SP: each all-gather of a norm's output moves 16 bits (the norm casts
    it once for the matmuls), as do the reduce-scatters of the blocks' 16-bit outputs and
    every gradient of these. Only the embedding's output - a lookup, fp32 - and its
    gradient move 32 bits: (4L + 1) halves and one whole b*s*h fp32 each way."""
    L, h = model_config("tiny").num_layers, model_config("tiny").hidden_size
    fp32_bytes = BATCH * SEQ * h * 4
    ledger = worlds(2).run(bf16_ledger, True)[0]
    gathers = ledger[("tp", "all_gather", "tp")]
    scatters = ledger[("tp", "reduce_scatter", "tp")]
    assert gathers.calls == scatters.calls == 4 * L + 2
    assert gathers.bytes == scatters.bytes == (4 * L + 1) * fp32_bytes // 2 + fp32_bytes


# At lr 3e-3 the GQA_PADDED model hits a loss spike at step 16 that amplifies any
# reordering of sums (dp=2 alone then drifts 2e-5 from one device); at 1e-3 it trains
# smoothly, and the comparison tests the parallelism rather than the spike.
TRAIN = {"default": ({}, {}), "gqa_padded": (GQA_PADDED, {"lr": 1e-3})}


@pytest.fixture(scope="module")
def references():
    return {key: train_and_report(fast_config(model=model, **train)) for key, (model, train) in TRAIN.items()}


def assert_same_training(run: dict, ref: dict):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=REL, atol=0)
    torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=REL, atol=0)
    for name, value in ref["params"].items():
        assert rel_err(run["params"][name], value) <= REL, name


@pytest.mark.parametrize("world_size, layout, model", [
    (2, {"tp": 2}, "default"),
    (2, {"tp": 2, "sequence_parallel": True}, "gqa_padded"),
    (4, {"tp": 4}, "gqa_padded"),
    pytest.param(4, {"tp": 4, "sequence_parallel": True}, "default", marks=pytest.mark.slow),  # tp2's SP, tp4's split
    pytest.param(4, {"tp": 2, "dp": 2}, "default", marks=pytest.mark.slow),  # the SP case below, test_composition
    (4, {"tp": 2, "dp": 2, "sequence_parallel": True}, "gqa_padded"),
])
def test_training_equals_single_device(worlds, references, world_size, layout, model):
    overrides, train = TRAIN[model]
    runs = worlds(world_size).run(train_and_report, fast_config(model=overrides, **layout, **train))
    for run in runs:
        assert_same_training(run, references[model])
