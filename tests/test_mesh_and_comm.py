"""Rank arithmetic of the mesh and the ledger's bookkeeping (no process groups)."""

import pytest

from meshpar.comm import Ledger
from meshpar.mesh import MeshShape, ParallelMesh


def test_rank_order_is_tp_fastest_then_cp_dp_pp():
    shape = MeshShape(pp=2, dp=2, cp=1, tp=2)
    assert shape.world_size == 8
    assert shape.coords(0) == {"pp": 0, "dp": 0, "cp": 0, "tp": 0}
    assert shape.coords(1) == {"pp": 0, "dp": 0, "cp": 0, "tp": 1}
    assert shape.coords(2) == {"pp": 0, "dp": 1, "cp": 0, "tp": 0}
    assert shape.coords(4) == {"pp": 1, "dp": 0, "cp": 0, "tp": 0}
    for rank in range(8):
        assert shape.rank(**shape.coords(rank)) == rank


def test_axis_groups_partition_the_world():
    shape = MeshShape(pp=2, dp=3, cp=2, tp=2)
    for axis in ("pp", "dp", "cp", "tp"):
        groups = shape.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(shape.world_size))
        assert all(len(g) == shape.size(axis) for g in groups)
    assert shape.axis_groups("tp")[0] == [0, 1]  # consecutive ranks: inside a node
    assert shape.axis_groups("pp")[0] == [0, 12]


def test_mesh_ranks_along_an_axis():
    mesh = ParallelMesh(MeshShape(pp=2, dp=2, tp=2), rank=5)
    assert mesh.coords() == {"pp": 1, "dp": 0, "cp": 0, "tp": 1}
    assert mesh.ranks("tp") == [4, 5]
    assert mesh.ranks("dp") == [5, 7]
    assert mesh.ranks("pp") == [1, 5]


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="outside a world of 4"):
        MeshShape(dp=4).coords(4)


def test_single_mesh_moves_nothing():
    import torch

    from meshpar import comm
    mesh = ParallelMesh.single()
    t = torch.ones(3)
    assert comm.all_reduce(mesh, "dp", t, tag="grads") is t
    assert mesh.ledger.entries == {}


def test_ledger_totals_and_summary():
    ledger = Ledger()
    ledger.record("dp", "all_reduce", "grads", 100, 150.0)
    ledger.record("dp", "all_reduce", "grads", 100, 150.0)
    ledger.record("dp", "all_reduce", "loss", 4, 6.0, inter_node=True)
    ledger.record("tp", "all_gather", "act", 64, 32.0)
    assert ledger.total("bytes", axis="dp", tag="grads") == 200
    assert ledger.total("calls", axis="dp") == 3
    assert ledger.total("wire_bytes") == 338.0
    assert ledger.total("inter_node_bytes") == 6.0
    assert ledger.summary() == {
        "dp": {"all_reduce": {"calls": 3, "bytes": 204, "wire_bytes": 306, "inter_node_bytes": 6}},
        "tp": {"all_gather": {"calls": 1, "bytes": 64, "wire_bytes": 32, "inter_node_bytes": 0}},
    }


def test_node_split_and_placement():
    shape = MeshShape(pp=2, dp=2, cp=1, tp=2)  # ranks: pp slowest, tp fastest
    assert shape.placement(4) == {"pp": "across 2 nodes", "dp": "inside a node", "tp": "inside a node"}
    assert shape.placement(2) == {"pp": "across 2 nodes", "dp": "across 2 nodes", "tp": "inside a node"}
    assert MeshShape(dp=8).node_split("dp", 4) == (4, 2)
    assert MeshShape(dp=4, tp=2).node_split("dp", 4) == (2, 2)
    assert MeshShape(dp=2, tp=4).node_split("dp", 4) == (1, 2)
    with pytest.raises(ValueError, match="unevenly"):
        MeshShape(dp=4, tp=3).node_split("dp", 4)  # dp ranks 0, 3, 6, 9 on nodes 0, 0, 1, 2
