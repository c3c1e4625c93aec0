"""Fault injection for testing recovery: MESHPAR_FAULT names a rank to kill with SIGKILL.

    MESHPAR_FAULT=kill:RANK:step:N   rank RANK dies right after finishing step N
    MESHPAR_FAULT=kill:RANK:save:N   rank RANK dies while checkpoint N is being written
                                     (its own file written, the checkpoint not yet published)

Only the first attempt of a job is affected (torchrun's TORCHELASTIC_RESTART_COUNT is
0 or unset), so a restarted job runs through.
"""

from __future__ import annotations

import os
import signal


class Faults:
    def __init__(self, rank: int, env=os.environ):
        self.when: tuple[str, int] | None = None
        spec = env.get("MESHPAR_FAULT")
        if spec and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            action, target, moment, step = spec.split(":")
            if action != "kill" or moment not in ("step", "save"):
                raise ValueError(f"MESHPAR_FAULT={spec!r}: expected kill:RANK:step:N or kill:RANK:save:N")
            if int(target) == rank:
                self.when = (moment, int(step))

    def at(self, moment: str, step: int):
        if self.when == (moment, step):
            os.kill(os.getpid(), signal.SIGKILL)
