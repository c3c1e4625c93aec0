"""Bytes saved for backward per layer, measured with saved_tensors_hooks, equal the
prediction region by region, in fp32 and under bf16 autocast; sequence parallelism
divides the norms' share by t."""

import pytest

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.train.activations import measure_layer, measure_saved_bytes, predicted_saved_bytes

BATCH, SEQ = 2, 32


ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def measure_on(shape: dict, sequence_parallel: bool, precision: str = "fp32"):
    mesh = ParallelMesh.build(MeshShape(**shape))
    return measure_layer(model_config("tiny"), mesh, BATCH, SEQ, sequence_parallel, precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_device_matches_prediction(precision):
    cfg = model_config("tiny")
    measured = measure_layer(cfg, ParallelMesh.single(), BATCH, SEQ, False, precision=precision)
    assert measured == predicted_saved_bytes(cfg, BATCH, SEQ, bytes_per_element=ELEMENT_BYTES[precision])


def test_a_norm_output_is_cast_to_16_bits_once():
    """bf16: q, k and v (and gate and up) read one 16-bit copy of the norm's output, kept
    once - autocast alone casts it for each projection and keeps every copy (2 more in
    attention, 1 more in the MLP)."""
    import torch
    from meshpar.model import llama
    cfg = model_config("tiny")
    once = measure_layer(cfg, ParallelMesh.single(), BATCH, SEQ, False, precision="bf16")
    original = llama.to_compute_dtype
    llama.to_compute_dtype = lambda x: x  # autocast casts at each matmul
    try:
        each = measure_layer(cfg, ParallelMesh.single(), BATCH, SEQ, False, precision="bf16")
    finally:
        llama.to_compute_dtype = original
    bsh_16 = BATCH * SEQ * cfg.hidden_size * torch.bfloat16.itemsize
    assert each["attention"] - once["attention"] == 2 * bsh_16
    assert each["mlp"] - once["mlp"] == bsh_16


def test_dropout_masks_are_counted():
    cfg = model_config("tiny", dropout=0.1)
    model = build_model(cfg, seed=0)
    import torch
    tokens = torch.randint(0, 256, (BATCH, SEQ))
    measured = measure_saved_bytes(model, model.layers[0], lambda: model(tokens))
    assert measured["attention_dropout"] > 0 and measured["mlp_dropout"] > 0


@pytest.mark.parametrize("shape, precision", [({"tp": 4}, "fp32"), ({"tp": 2, "dp": 2}, "fp32"),
                                             ({"tp": 2, "dp": 2}, "bf16")])
def test_tensor_and_sequence_parallel_match_prediction(worlds, shape, precision):
    cfg = model_config("tiny")
    t, c = shape["tp"], ELEMENT_BYTES[precision]
    single = predicted_saved_bytes(cfg, BATCH, SEQ, bytes_per_element=c)
    for sp in (False, True):
        for measured in worlds(4).run(measure_on, shape, sp, precision):
            assert measured == predicted_saved_bytes(cfg, BATCH, SEQ, tp=t, sequence_parallel=sp, bytes_per_element=c)
            for norm in ("attention_norm", "mlp_norm"):
                if sp:  # Korthikanti 2022: SP shards the norm activations t ways
                    assert measured[norm] <= single[norm] / t * 1.1
                else:
                    assert measured[norm] == single[norm]
