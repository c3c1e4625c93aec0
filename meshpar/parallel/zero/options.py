"""ZeRO's options and their rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshpar.options import Section, comma_list, option

if TYPE_CHECKING:
    from meshpar.config import Config

STAGES = (0, 1, 2, 3)
OFFLOADS = ("optimizer", "params")


@dataclass
class ZeroOptions(Section):
    """ZeRO over dp: which of the training state is sharded, and what lives in host memory."""

    stage: int = option(0, "ZeRO stage: 0 replicated, 1 optimizer states sharded, 2 and gradients, 3 and "
                           "parameters", flag="--zero", choices=STAGES)
    offload: list[str] = option([], "keep in host memory: optimizer (states, master weights and the step), "
                                    "params (ZeRO-3 shards; implies optimizer); comma-separated",
                                parse=comma_list(str, "names"))

    def problems(self, cfg: Config) -> list[str]:
        problems = []
        unknown = [o for o in self.offload if o not in OFFLOADS]
        if unknown:
            problems.append(f"--offload {','.join(unknown)}: choose from {', '.join(OFFLOADS)}")
        if "params" in self.offload and self.stage != 3:
            problems.append("--offload params keeps parameter shards in host memory: it needs --zero 3")
        return problems
