"""The hang watchdog: a thread that ends the process when this rank has waited on one
collective longer than `--comm-timeout`, after printing where it is stuck.

A hang in distributed training is one rank that never arrives (an exception it did not
share, a different number of collectives, a dead peer) and every other rank waiting for
it forever. The watchdog turns that into a prompt, non-zero exit with a report: this
rank's mesh coordinates, the operation and the ranks of the group it waits on, and its
last 20 collectives. The launcher (meshpar's or torchrun) then stops the other ranks.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from meshpar.mesh import ParallelMesh

EXIT_CODE = 3


class Watchdog:
    def __init__(self, mesh: ParallelMesh, timeout_s: float, stream=None, exit=os._exit):
        self.mesh, self.timeout_s = mesh, timeout_s
        self.stream, self.exit = stream or sys.stderr, exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="meshpar-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            pending = self.mesh.ledger.pending
            if pending is not None and time.monotonic() - pending[0] > self.timeout_s:
                self.stream.write(self.report(pending))
                self.stream.flush()
                self.exit(EXIT_CODE)
                return

    def report(self, pending) -> str:
        since, axis, op, tag = pending
        base = axis.removesuffix("_p2p")
        if axis == "world":
            ranks = list(range(self.mesh.world_size))
        elif base in ("pp", "dp", "cp", "tp"):
            ranks = self.mesh.ranks(base)
        else:
            ranks = "its sub-group of dp"
        coords = ", ".join(f"{a}={i}" for a, i in self.mesh.coords().items())
        lines = [f"meshpar watchdog: rank {self.mesh.rank} ({coords}) has waited "
                 f"{time.monotonic() - since:.1f} s (--comm-timeout {self.timeout_s:g}) in {op} over {axis} "
                 f"(ranks {ranks}) for {tag!r}; exiting with code {EXIT_CODE}",
                 f"  its last {len(self.mesh.ledger.history)} collectives, oldest first:"]
        for when, h_axis, h_op, h_tag, nbytes in self.mesh.ledger.history:
            stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
            lines.append(f"    {stamp}  {h_axis:<8} {h_op:<18} {h_tag:<16} {nbytes:>12,} bytes")
        return "\n".join(lines) + "\n"
