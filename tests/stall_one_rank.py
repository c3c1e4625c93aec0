"""Run as a script: `stall_one_rank.py TIMEOUT [WHERE]`, two gloo ranks; rank 1 stalls
outside any collective while rank 0 waits on it. Rank 0's watchdog (TIMEOUT seconds)
reports and exits; the launcher then stops rank 1. WHERE rank 0 waits:

    collective   an all-reduce over dp (the default)
    ring         ring attention's exchange of K/V blocks over cp
    pp_send      the pipeline's wait on its sends of activations (64 MiB: more than the
                 transport buffers without a receiver)

Used by test_observability.py."""

import os
import sys
import time
import types
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = {"collective": {"dp": 2}, "ring": {"cp": 2}, "pp_send": {"pp": 2}}


def rank_main(rank: int, timeout_s: float, where: str, port: int):
    from meshpar import comm
    from meshpar.mesh import MeshShape, ParallelMesh
    from meshpar.parallel.context import RingAttention
    from meshpar.pipeline.runtime import PipelineRuntime
    from meshpar.train.watchdog import Watchdog

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s + 60))
    mesh = ParallelMesh.build(MeshShape(**SHAPES[where]))
    Watchdog(mesh, timeout_s).start()
    axis = next(iter(SHAPES[where]))
    for _ in range(3):
        comm.all_reduce(mesh, axis, torch.ones(4), tag="warmup")
    if rank == 1:
        time.sleep(120)  # stuck outside any collective
    if where == "collective":
        comm.all_reduce(mesh, "dp", torch.ones(4), tag="loss")
    elif where == "ring":
        q = torch.randn(1, 2, 8, 4)
        RingAttention.apply(q, q, q, mesh)
    else:
        sends, _ = comm.batch_send_recv(mesh, "pp", [(torch.ones(16 * 2**20), mesh.peer("pp", 1), 0, "activations")],
                                        [])
        runtime = types.SimpleNamespace(mesh=mesh, state=types.SimpleNamespace(pending_sends=sends))
        PipelineRuntime._wait_sends(runtime)


if __name__ == "__main__":
    from meshpar.train.launch import free_port

    where = sys.argv[2] if len(sys.argv) > 2 else "collective"
    mp.start_processes(rank_main, args=(float(sys.argv[1]), where, free_port()), nprocs=2, start_method="spawn")
