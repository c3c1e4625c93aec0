"""Activation recomputation changes no number - alone, with TP+SP and with PP - and saves
exactly the predicted bytes per layer."""

import pytest
import torch
import torch.nn.functional as F

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.apply import split_model
from meshpar.train.activations import measure_layer, predicted_saved_bytes
from reference import fast_config, train_and_report

POLICIES = [("full", 1), ("full", 2), ("selective", 1)]


def grads_after_one_step(recompute: str, every: int, dropout: float) -> dict:
    cfg = model_config("tiny", dropout=dropout)
    parallel = split_model(build_model(cfg, seed=0), ParallelMesh.single(), recompute=recompute,
                           recompute_every=every)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)  # dropout masks
    loss = F.cross_entropy(parallel.module(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return {"loss": loss.item(), **{n: p.grad.clone() for n, p in parallel.module.named_parameters()}}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("policy, every", POLICIES)
def test_recompute_changes_no_number(policy, every, dropout):
    expected = grads_after_one_step("none", 1, dropout)
    actual = grads_after_one_step(policy, every, dropout)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-6, atol=1e-7, msg=name)  # dropout masks too


def with_recompute(cfg, policy, every=1):
    cfg.recompute.recompute, cfg.recompute.recompute_every = policy, every
    return cfg


@pytest.mark.parametrize("layout", [{"tp": 2, "sequence_parallel": True}, pytest.param({"pp": 2}, marks=pytest.mark.slow),
                                    {"pp": 2, "schedule": "zb-h1"}])  # recomputed in I, linears split
def test_recompute_with_tp_sp_and_pp(worlds, layout):
    def config(policy="none", every=1):
        cfg = fast_config(steps=5, micro_batch_size=4, tp=layout.get("tp", 1),
                          sequence_parallel=layout.get("sequence_parallel", False))
        cfg.mesh.pp = layout.get("pp", 1)
        cfg.pipeline.schedule = layout.get("schedule", cfg.pipeline.schedule)
        return with_recompute(cfg, policy, every)

    baseline = worlds(2).run(train_and_report, config())
    for policy, every in POLICIES:
        for run, ref in zip(worlds(2).run(train_and_report, config(policy, every)), baseline):
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0)
            for name, value in ref["params"].items():
                torch.testing.assert_close(run["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def measure_policies(shape: dict):
    mesh = ParallelMesh.build(MeshShape(**shape))
    return {policy: measure_layer(model_config("tiny"), mesh, 2, 32, shape["tp"] > 1, recompute=policy)
            for policy in ("none", "selective", "full")}


@pytest.mark.parametrize("precision, element_bytes", [("fp32", 4), ("bf16", 2)])
def test_single_device_bytes_match_prediction(precision, element_bytes):
    cfg = model_config("tiny")
    for policy in ("none", "selective", "full"):
        measured = measure_layer(cfg, ParallelMesh.single(), 2, 32, False, recompute=policy, precision=precision)
        assert measured == predicted_saved_bytes(cfg, 2, 32, recompute=policy, bytes_per_element=element_bytes)
    assert predicted_saved_bytes(cfg, 2, 32, recompute="full")["total"] == (2 * 32 * 64 + 32 * 8) * 4


@pytest.mark.parametrize("shape", [{"tp": 4}, {"tp": 2, "dp": 2}])
def test_bytes_with_sequence_parallel_match_prediction(worlds, shape):
    cfg = model_config("tiny")
    for measured in worlds(4).run(measure_policies, shape):
        for policy, got in measured.items():
            assert got == predicted_saved_bytes(cfg, 2, 32, shape["tp"], True, recompute=policy), policy
        assert measured["full"]["total"] < measured["selective"]["total"] < measured["none"]["total"]
