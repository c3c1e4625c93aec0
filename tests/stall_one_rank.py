"""Run as a script: two gloo ranks; rank 1 stalls outside any collective while rank 0
waits in an all-reduce. Rank 0's watchdog (timeout from argv) reports and exits; the
launcher then stops rank 1. Used by test_observability.py."""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, timeout_s: float, port: int):
    from meshpar import comm
    from meshpar.mesh import MeshShape, ParallelMesh
    from meshpar.train.watchdog import Watchdog

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s + 60))
    mesh = ParallelMesh.build(MeshShape(dp=2))
    Watchdog(mesh, timeout_s).start()
    for _ in range(3):
        comm.all_reduce(mesh, "dp", torch.ones(4), tag="warmup")
    if rank == 1:
        time.sleep(120)  # stuck outside any collective
    comm.all_reduce(mesh, "dp", torch.ones(4), tag="loss")


if __name__ == "__main__":
    from meshpar.train.launch import free_port

    mp.start_processes(rank_main, args=(float(sys.argv[1]), free_port()), nprocs=2, start_method="spawn")
