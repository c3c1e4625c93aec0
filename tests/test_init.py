"""Sharded initialization (meshpar/init.py): any box of a parameter, filled alone, equals
that box of the whole parameter; a meta-built model sliced for a rank and materialized
holds exactly the reference's values and allocates exactly its share. One process, no
process group: a mesh without groups is enough to slice."""

from __future__ import annotations

import pytest
import torch

from meshpar.init import Box, InitRule, fill, materialize, tile_shape
from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.model.llama import initialize
from meshpar.parallel.apply import split_model
from meshpar.checkpoint.regions import box_of
from meshpar.parallel.sharding import model_names


def whole(shape, name="w", rule=InitRule("normal", 0.02), seed=7) -> torch.Tensor:
    out = torch.empty(shape)
    fill(out, Box.whole(shape), name, rule, seed)
    return out


@pytest.mark.parametrize("shape", [(520, 300), (140_000,), (3, 260, 257)])
def test_any_box_equals_that_box_of_the_whole_parameter(shape):
    reference = whole(shape)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        offsets, valid = [], []
        for n in shape:
            lo = int(torch.randint(0, n, (1,), generator=generator))
            hi = int(torch.randint(lo + 1, n + 1, (1,), generator=generator))
            offsets.append(lo)
            valid.append(hi - lo)
        padding = [int(torch.randint(0, 3, (1,), generator=generator)) for _ in shape]
        local = tuple(v + p for v, p in zip(valid, padding))
        box = Box(tuple(shape), tuple(offsets), tuple(valid), local)
        out = torch.full(local, float("nan"))
        fill(out, box, "w", InitRule("normal", 0.02), 7)
        inside = tuple(slice(o, o + v) for o, v in zip(offsets, valid))
        assert torch.equal(out[tuple(slice(0, v) for v in valid)], reference[inside])
        assert int((out != 0).sum()) == box.volume()  # padding is zero


def test_tiles_are_independent_of_name_seed_and_position():
    """Different names, seeds and tiles draw different numbers; the statistics are the rule's."""
    a = whole((512, 512))
    assert tile_shape((512, 512)) == (256, 256)
    tiles = [a[i:i + 256, j:j + 256] for i in (0, 256) for j in (0, 256)]
    assert all(not torch.equal(tiles[0], t) for t in tiles[1:])
    assert not torch.equal(a, whole((512, 512), name="v"))
    assert not torch.equal(a, whole((512, 512), seed=8))
    assert abs(float(a.std()) - 0.02) < 0.001 and abs(float(a.mean())) < 0.001
    assert torch.equal(whole((5, 7), rule=InitRule("ones")), torch.ones(5, 7))
    with pytest.raises(ValueError, match="choose normal, ones or zeros"):
        InitRule("uniform")


@pytest.mark.parametrize("shape,sequence_parallel", [
    (MeshShape(tp=2, pp=2), False),
    (MeshShape(tp=4), True),  # 2 KV heads replicated over 4 ranks; 250 tokens padded to 252
    (MeshShape(tp=8, pp=2), False),  # 250 tokens padded to 256 (the last rank holds 26 real rows)
])
def test_meta_built_rank_shares_equal_the_reference(shape, sequence_parallel):
    """Every rank of the layout, built on meta and materialized alone, holds exactly the
    reference's elements of its boxes, and allocates exactly its parameters' bytes."""
    cfg = model_config("tiny", vocab_size=250, num_kv_heads=2, tie_embeddings=False)
    reference = dict(build_model(cfg, seed=3).named_parameters())
    for rank in range(shape.world_size):
        mesh = ParallelMesh(shape, rank)
        meta = build_model(cfg, seed=3, device="meta")
        parallel = split_model(meta, mesh, sequence_parallel=sequence_parallel, num_stages=shape.pp)
        materialize(parallel.module, mesh, "cpu", initialize(cfg, 3))
        held = model_names(parallel.module)
        assert held and not any(p.is_meta for _, p in held)
        for name, param in held:
            box = box_of(param, mesh)
            inside = tuple(slice(o, o + v) for o, v in zip(box.offsets, box.valid))
            real = tuple(slice(0, v) for v in box.valid)
            assert torch.equal(param.detach()[real], reference[name].detach()[inside]), name
            assert int(param.detach().count_nonzero()) == int(reference[name].detach()[inside].count_nonzero())


def test_materialize_allocates_only_the_share_and_keeps_ties():
    cfg = model_config("tiny", tie_embeddings=True)
    shape = MeshShape(tp=2, pp=2)
    total = sum(p.numel() * 4 for p in build_model(cfg, 0, "meta").parameters())
    shares = []
    for rank in range(shape.world_size):
        mesh = ParallelMesh(shape, rank)
        parallel = split_model(build_model(cfg, 0, "meta"), mesh, num_stages=2)  # meta, no fill yet
        module = parallel.module
        params = {id(p): p for p in module.parameters()}
        assert all(p.is_meta for p in params.values())
        before = {id(p) for p in params.values()}
        allocated = materialize(module, mesh, "cpu", initialize(cfg, 0))
        assert {id(p) for p in module.parameters()} == before  # the same Parameter objects
        assert allocated == sum(p.numel() * 4 for p in params.values())
        shares.append(allocated)
        if mesh.index("pp") == 0:
            assert module.embedding.weight.shape[0] == cfg.vocab_size // 2
    # tp halves everything but norms; the tied weight is held by both ends of the pipeline
    assert max(shares) < 0.7 * total


def test_a_buffer_left_on_meta_is_refused():
    module = torch.nn.Module()
    with torch.device("meta"):
        module.register_buffer("table", torch.zeros(3))
    with pytest.raises(ValueError, match="buffer Module.table is on the meta device"):
        materialize(module, None, "cpu", None)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_fills_its_buffers_and_under_stage3_draws_only_its_shard(stage):
    """ZeRO gives a meta-built model its storage in the flat buckets: at stage 1 each rank
    holds every value, at stage 3 it draws only its shard's rows - and what it holds equals
    the one-device model's elements there. Built per dp rank without process groups
    (construction runs no collective)."""
    from meshpar.parallel.zero import ShardedDataParallel
    from meshpar.init import Materialization

    cfg = model_config("tiny")
    reference = dict(build_model(cfg, seed=3).named_parameters())
    total = sum(p.numel() for p in reference.values())
    for rank in range(2):
        mesh = ParallelMesh(MeshShape(dp=2), rank)
        model = build_model(cfg, 3, "meta")
        drawn = []
        fill = initialize(cfg, 3)

        def counting(out, box, name):
            drawn.append(out.numel())
            fill(out, box, name)
        zero = ShardedDataParallel(model, mesh, stage, materialize=Materialization("cpu", mesh, counting))
        names = {id(p): n for n, p in model_names(model)}
        for b in zero.buckets:
            whole = torch.cat([reference[names[id(p)]].detach().reshape(-1) for p in b.params])
            whole = torch.cat([whole, whole.new_zeros(b.numel - whole.numel())])
            assert torch.equal(b.param_shard, whole[b.shard[0]:b.shard[1]])
            if stage == 1:
                assert torch.equal(b.param_flat, whole)
        if stage == 1:
            assert sum(drawn) == total
        else:  # its half, give or take the rows cut at a shard's two ends
            assert total / 2 <= sum(drawn) <= total / 2 + 2 * 64 * len(zero.buckets)
            assert all(b.param_flat.untyped_storage().size() == 0 for b in zero.buckets)


def test_a_frozen_parameter_outside_every_bucket_is_materialized_too():
    from meshpar.parallel.zero import ShardedDataParallel
    from meshpar.init import Materialization

    cfg = model_config("tiny")
    model = build_model(cfg, 3, "meta")
    model.norm.weight.requires_grad_(False)  # frozen: no bucket holds it
    mesh = ParallelMesh.single()
    zero = ShardedDataParallel(model, mesh, 0, materialize=Materialization("cpu", mesh, initialize(cfg, 3)))
    assert all(id(p) != id(model.norm.weight) for p in zero.params())
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.norm.weight.detach(), torch.ones(cfg.hidden_size))
    assert torch.equal(model.layers[0].attention.wq.weight.detach(),
                       build_model(cfg, 3).layers[0].attention.wq.weight.detach())
