"""Learning-rate schedule, batch-size scaling and clipping (single process)."""

import math

import pytest
import torch

from meshpar.config import Config
from meshpar.mesh import ParallelMesh
from meshpar.train.optim import clip_grads, lr_at, peak_lr


def test_warmup_then_cosine_to_the_floor():
    cfg = Config().update(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(109, cfg) == pytest.approx(1e-4)
    midpoint = 10 + (110 - 10 - 1) / 2
    assert lr_at(int(midpoint), cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_lr_scaling_with_batch():
    cfg = Config().update(lr=1e-3, global_batch_size=256, lr_scale_from=64)
    assert peak_lr(cfg) == pytest.approx(4e-3)
    assert peak_lr(Config().update(lr=1e-3)) == 1e-3


def test_clipping_scales_to_max_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grads(params, 1.0, ParallelMesh.single())
    assert norm == pytest.approx(5.0)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
    # under the limit, and with clipping off, nothing changes
    assert clip_grads(params, 2.0, ParallelMesh.single()) == pytest.approx(1.0, rel=1e-5)
    assert params[0].grad[0].item() == pytest.approx(0.6, rel=1e-5)
    assert clip_grads(params, 0.0, ParallelMesh.single()) == pytest.approx(1.0, rel=1e-5)


def test_clipping_under_the_limit_skips_the_pass_and_changes_no_bit():
    """With the norm read on the host, a norm clearly under the limit multiplies nothing
    (its scale would be exactly 1); at the limit the gradients are still scaled."""

    from meshpar.train.optim import clip_by_norm

    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(0))]
    norm = torch.linalg.vector_norm(grads[0])
    for max_norm in (norm.item() * 1.01, norm.item() * 100):
        kept = grads[0].clone()
        with torch.autograd.profiler.profile() as prof:
            clip_by_norm(grads, norm, max_norm, norm.item())
        assert not any("foreach_mul" in e.name for e in prof.function_events)
        assert torch.equal(grads[0], kept)
        unskipped = [kept.clone()]
        clip_by_norm(unskipped, norm, max_norm)  # no host value: the multiply runs, by exactly 1
        assert torch.equal(unskipped[0], kept)
    clip_by_norm(grads, norm, norm.item() * 0.9995, norm.item())  # within the margin: scaled
    assert torch.linalg.vector_norm(grads[0]).item() == pytest.approx(norm.item() * 0.9995, rel=1e-6)
