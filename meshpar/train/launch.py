"""Start the ranks of a run: in this process, as local processes, or under torchrun.

Under torchrun (RANK and WORLD_SIZE in the environment) each process is one rank and
torchrun's rendezvous variables say where rank 0 listens; a multi-node run is one
torchrun command per node. Otherwise meshpar starts world_size local processes itself,
each with the same environment torchrun would give it.
"""

from __future__ import annotations

import gc
import os
import resource
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshpar.config import Config, ranks_per_node
from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.train.host_memory import return_freed_memory
from meshpar.train.metrics import format_bytes
from meshpar.train.trainer import Trainer
from meshpar.train.watchdog import Watchdog

# The process group's own timeout sits past the watchdog's, so the watchdog reports first.
TIMEOUT_MARGIN_S = 60


def under_torchrun(env=os.environ) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mesh_shape(cfg: Config) -> MeshShape:
    p = cfg.parallel
    return MeshShape(pp=p.pp, dp=p.dp, cp=p.cp, tp=p.tp)


def build_mesh(cfg: Config) -> ParallelMesh:
    """This rank's mesh, its nodes as torchrun (or --ranks-per-node) describes them."""
    if cfg.parallel.world_size == 1:
        return ParallelMesh.single()
    return ParallelMesh.build(mesh_shape(cfg), ranks_per_node(cfg.parallel))


def set_cpu_threads(local_world_size: int):
    """Share the cores between the local ranks instead of oversubscribing them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def restart_safe_store(timeout: timedelta, env=os.environ) -> dict:
    """Under torchrun, the rendezvous store outlives a restart (its server is shared
    between rounds), and with it the addresses the dead attempt's ranks published: a
    restarted rank would dial them and fail. Each attempt gets its own key prefix."""
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        return {}
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    hosted_by_agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                          is_master=not hosted_by_agent and rank == 0, timeout=timeout, multi_tenant=True)
    prefix = f"meshpar/attempt-{env['TORCHELASTIC_RESTART_COUNT']}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world_size}


def collective_backend(cfg: Config) -> str:
    return cfg.train.backend or ("nccl" if cfg.train.device == "cuda" else "gloo")


def run_rank(cfg: Config) -> dict:
    """Train as the rank torchrun's environment variables describe; returns the summary."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.train.return_freed_memory:
        return_freed_memory()
    set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    backend = collective_backend(cfg)
    if cfg.train.device == "cuda":
        # NCCL: one GPU per rank (validated). Gloo ranks may share GPUs, for tests.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=cfg.train.comm_timeout + TIMEOUT_MARGIN_S)
    dist.init_process_group(backend, timeout=timeout, **restart_safe_store(timeout))
    try:
        mesh = build_mesh(cfg)
        mesh.host_staging = backend == "gloo" and device.type == "cuda"
        watchdog = Watchdog(mesh, cfg.train.comm_timeout).start()
        summary = Trainer(cfg, mesh, device).run().summary
        watchdog.stop()
        # The trainer's gradient hooks form reference cycles around tensors that gloo's
        # worker threads have handled; free them now, not during interpreter shutdown
        # (where their release can abort the process).
        gc.collect()
        return summary
    finally:
        dist.destroy_process_group()


def _local_rank_main(rank: int, cfg: Config, world_size: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    run_rank(cfg)


def launch(cfg: Config) -> dict | None:
    """Run a validated config. Returns the summary when this process trained rank 0's
    share itself (one rank, or under torchrun), None after spawning local ranks."""
    if under_torchrun():
        return run_rank(cfg)
    world_size = cfg.parallel.world_size
    if world_size == 1:
        if cfg.train.return_freed_memory:
            return_freed_memory()
        device = torch.device(cfg.train.device)
        return Trainer(cfg, ParallelMesh.single(), device).run().summary
    mp.start_processes(_local_rank_main, args=(cfg, world_size, free_port()),
                       nprocs=world_size, join=True, start_method="spawn")
    if cfg.train.progress:
        print(f"peak resident memory of the largest rank: {format_bytes(largest_child_rss())} "
              f"(the kernel's count, every rank finished)")
    return None


def largest_child_rss() -> int:
    """The largest peak resident set among this process's finished children, in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
