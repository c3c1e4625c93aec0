"""A multi-rank test harness: a gloo world of processes, started once, runs many checks.

    world = World(4)
    results = world.run(check_fn, arg)   # check_fn(arg) runs on every rank
    world.close()

Each rank has an initialised default process group (gloo) and one CPU thread. A check
that raises on any rank fails with that rank's traceback; a check that does not finish
within the timeout fails with the ranks still running named, and the world is torn down
(the next `run` on a closed world raises).
"""

from __future__ import annotations

import gc
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from meshpar.train.launch import free_port

GRACE_AFTER_FAILURE_S = 10  # how long the other ranks get once one rank has failed


class RankFailure(AssertionError):
    pass


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or repr(fn)  # a functools.partial has none


def _rank_main(rank: int, world_size: int, port: int, tasks, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report everything, including assertion errors
            results.put((rank, False, traceback.format_exc()))
        task = fn = args = None
        settle()
    dist.destroy_process_group()


def settle():
    """Free what the last check left in reference cycles, then exempt everything still
    alive - the modules the checks imported, the process group - from later collections:
    the harness collects after every run (reference.trainer_on_this_rank), and a full
    collection over the 300k+ objects of torch, transformers and the tests took 0.13 s a
    run per rank."""
    gc.collect()
    gc.freeze()


class World:
    def __init__(self, size: int, timeout_s: float = 240):
        self.size, self.timeout_s = size, timeout_s
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, size, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(size)]
        for proc in self.procs:
            proc.start()
        self.closed = False

    def run(self, fn, *args, timeout_s: float | None = None) -> list:
        """fn(*args) on every rank; the list of their return values, by rank."""
        if self.closed:
            raise RankFailure(f"the {self.size}-rank world was torn down by an earlier failure")
        try:  # a queue pickles in a background thread: a failure there would only time out
            pickle.dumps((fn, args))
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise TypeError(f"{_name(fn)} and its arguments must pickle to reach the ranks: {err}") from None
        for q in self.tasks:
            q.put((fn, args))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        values, failures = {}, {}
        while len(values) + len(failures) < self.size:
            now = time.monotonic()
            if now > deadline:
                missing = sorted(set(range(self.size)) - set(values) - set(failures))
                self.close(force=True)
                raise RankFailure(self._report(fn, failures) + f"\nranks {missing} did not finish "
                                  f"{_name(fn)} in time; the world was torn down")
            try:
                rank, ok, value = self.results.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.close(force=True)
                    raise RankFailure(f"ranks {dead} died while running {_name(fn)}") from None
                continue
            (values if ok else failures)[rank] = value
            if failures:
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        if failures:
            self.close(force=True)
            raise RankFailure(self._report(fn, failures))
        return [values[r] for r in range(self.size)]

    @staticmethod
    def _report(fn, failures: dict) -> str:
        return "\n".join(f"--- rank {r} failed in {_name(fn)}:\n{tb}" for r, tb in sorted(failures.items()))

    def close(self, force: bool = False):
        if self.closed:
            return
        self.closed = True
        if not force:
            for q in self.tasks:
                q.put(None)
            for proc in self.procs:
                proc.join(timeout=10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
