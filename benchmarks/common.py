"""What every benchmark here does: start a gloo world of local processes, give each rank
its share of the cores, and collect rank 0's result lines."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshpar.train.launch import free_port


def init_rank(rank: int, world_size: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=5))


def _entry(rank, rank_main, world_size, port, args, results):
    init_rank(rank, world_size, port)
    try:
        rank_main(rank, args, results)
    finally:
        dist.destroy_process_group()


def run_on_local_ranks(rank_main, world_size: int, args, num_results: int) -> list:
    """rank_main(rank, args, results) on `world_size` gloo ranks; rank 0 puts
    `num_results` items on `results`, returned in order."""
    results = mp.get_context("spawn").Queue()
    mp.start_processes(_entry, args=(rank_main, world_size, free_port(), args, results),
                       nprocs=world_size, start_method="spawn")
    return [results.get() for _ in range(num_results)]


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far, by every process on the machine:
    all gloo traffic between local ranks, headers included."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])  # transmit bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def timed_across_ranks(fn) -> float:
    """Seconds `fn()` takes on every rank, between two barriers (the slowest rank's time)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def random_batches(steps: int, batch: int, seq: int, dp: int, dp_rank: int, vocab: int = 256, seed: int = 0):
    """`steps` (inputs, targets) of this dp rank's rows of `batch` random sequences."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, vocab, (batch, seq + 1), generator=g).chunk(dp)[dp_rank]
        yield rows[:, :-1], rows[:, 1:]


def ranks(values: list[float]) -> list[float]:
    """Each value's place in ascending order (0 for the smallest)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (no ties)."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))
