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
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshpar.mesh import ParallelMesh
from meshpar.model.config import LARGE_PRESETS
from meshpar.options import Section, option
from meshpar.train.host_memory import return_freed_memory
from meshpar.train.metrics import format_bytes
from meshpar.train.watchdog import Watchdog

if TYPE_CHECKING:
    from meshpar.config import Config

# The process group's own timeout sits past the watchdog's, so the watchdog reports first.
TIMEOUT_MARGIN_S = 60


@dataclass
class RunOptions(Section):
    """The run: its length, seed, evaluation, and where it runs."""

    steps: int = option(200, "optimizer steps", at_least=1)
    seed: int = option(0, "seed of the weights and the data order", at_least=0)
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)", at_least=0)
    eval_batches: int = option(4, "global batches per evaluation", at_least=1)
    device: Literal["cpu", "cuda"] = option("cpu", "where the ranks compute")
    backend: Literal["nccl", "gloo"] | None = option(None, "collectives: nccl (one rank per GPU) or gloo (CPUs; "
                                                           "with --device cuda, ranks may share a GPU, for tests); "
                                                           "default nccl with cuda, gloo on cpu")
    return_freed_memory: bool = option(False, "give host memory freed in a step back to the system at once "
                                              "(glibc): 8% less peak resident memory for a 292M model's rank, "
                                              "12% slower steps on CPU")
    progress: bool = option(True, "a progress bar and a summary (--no-progress: neither)")
    dry_run: bool = option(False, "build each pipeline stage on the meta device, print per-rank parameters, "
                                  "memory estimates and the pipeline schedule, and exit without training "
                                  "(any model size)")

    def problems(self, cfg: Config) -> list[str]:
        problems = []
        model = cfg.model_config()
        if model is not None and cfg.model.name in LARGE_PRESETS and self.device == "cpu" and not self.dry_run:
            problems.append(f"model {cfg.model.name} has {model.num_params() / 1e9:.1f}B parameters: too large "
                            f"to train on a CPU; use --device cuda, or tiny or small, or check the layout with "
                            f"--dry-run")
        if self.backend == "nccl" and self.device == "cpu":
            return problems + ["--backend nccl needs --device cuda; on CPUs use gloo"]
        if self.device == "cuda" and cfg.mesh.valid:
            available = torch.cuda.device_count()
            local_ranks = int(cfg.environ().get("LOCAL_WORLD_SIZE", cfg.mesh.world_size))
            if available == 0:
                problems.append("--device cuda, but no CUDA device is visible; use --device cpu")
            elif local_ranks > available and self.backend != "gloo":
                problems.append(f"--device cuda with {local_ranks} local ranks needs {local_ranks} GPUs (NCCL "
                                f"puts one rank on each); {available} visible. --backend gloo lets ranks share "
                                f"a GPU (slowly: for tests)")
        return problems


def under_torchrun(env=os.environ) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(cfg: Config) -> ParallelMesh:
    """This rank's mesh, its nodes as torchrun (or --ranks-per-node) describes them."""
    if cfg.mesh.world_size == 1:
        return ParallelMesh.single()
    return ParallelMesh.build(cfg.mesh.shape, cfg.mesh.node_size(), ep=cfg.mesh.ep)


def set_cpu_threads(local_world_size: int):
    """Share the cores between the local ranks instead of oversubscribing them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def restart_safe_store(timeout: timedelta, env=os.environ) -> dict:
    """Under torchrun the agents' store outlives a restart (its server is shared between
    rounds), and with it the addresses the dead attempt's ranks published: a restarted
    rank would dial them and fail. Each attempt gets its own key prefix, named by the
    restart count. That count is each node's own: an agent that restarts its ranks
    because another node rejoined counts nothing, so on several nodes two nodes can name
    one attempt differently and never meet - there, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    gives every round a fresh store hosted by rank 0 (`meshpar cluster run` sets it), and
    no prefix is needed."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # not under torchrun, or a fresh store each round
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    nodes, restarts = int(env.get("GROUP_WORLD_SIZE", 1)), int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if rank == 0 and nodes > 1 and restarts > 0:
        print(f"meshpar: warning: torchrun restarts on {nodes} nodes share one store across rounds; the nodes' "
              "restart counts can differ and a restarted job then never meets. Set "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node.", file=sys.stderr, flush=True)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout, multi_tenant=True)
    prefix = f"meshpar/attempt-{env['TORCHELASTIC_RESTART_COUNT']}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world_size}


def collective_backend(cfg: Config) -> str:
    return cfg.run.backend or ("nccl" if cfg.run.device == "cuda" else "gloo")


def run_rank(cfg: Config) -> dict:
    """Train as the rank torchrun's environment variables describe; returns the summary."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.run.return_freed_memory:
        return_freed_memory()
    set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    backend = collective_backend(cfg)
    if cfg.run.device == "cuda":
        # NCCL: one GPU per rank (validated). Gloo ranks may share GPUs, for tests.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=cfg.observe.comm_timeout + TIMEOUT_MARGIN_S)
    dist.init_process_group(backend, timeout=timeout, **restart_safe_store(timeout))
    try:
        mesh = build_mesh(cfg)
        mesh.host_staging = backend == "gloo" and device.type == "cuda"
        watchdog = Watchdog(mesh, cfg.observe.comm_timeout).start()
        summary = train(cfg, mesh, device)
        watchdog.stop()
        # The trainer's gradient hooks form reference cycles around tensors that gloo's
        # worker threads have handled; free them now, not during interpreter shutdown
        # (where their release can abort the process).
        gc.collect()
        return summary
    finally:
        dist.destroy_process_group()


def train(cfg: Config, mesh: ParallelMesh, device: torch.device) -> dict:
    """This rank's share of the run; its summary."""
    from meshpar.train.trainer import Trainer  # the trainer builds on the options declared above

    return Trainer(cfg, mesh, device).run().summary


def local_rank_env(rank: int, world_size: int, port: int, *, master_addr: str = "127.0.0.1",
                   local_rank: int | None = None, local_world_size: int | None = None) -> dict[str, str]:
    """What torchrun would set for rank `rank` of `world_size`, meeting at `master_addr`:`port`
    (by default every rank on this one node: its local rank is its rank)."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank if local_rank is None else local_rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size if local_world_size is None else local_world_size)}


def _local_rank_main(rank: int, cfg: Config, world_size: int, port: int):
    os.environ.update(local_rank_env(rank, world_size, port))
    run_rank(cfg)


def launch(cfg: Config) -> dict | None:
    """Run a validated config. Returns the summary when this process trained rank 0's
    share itself (one rank, or under torchrun), None after spawning local ranks."""
    if under_torchrun():
        return run_rank(cfg)
    world_size = cfg.mesh.world_size
    if world_size == 1:
        if cfg.run.return_freed_memory:
            return_freed_memory()
        device = torch.device(cfg.run.device)
        return train(cfg, ParallelMesh.single(), device)
    mp.start_processes(_local_rank_main, args=(cfg, world_size, free_port()),
                       nprocs=world_size, join=True, start_method="spawn")
    if cfg.run.progress:
        print(f"peak resident memory of the largest rank: {format_bytes(largest_child_rss())} "
              f"(the kernel's count, every rank finished)")
    return None


def largest_child_rss() -> int:
    """The largest peak resident set among this process's finished children, in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
