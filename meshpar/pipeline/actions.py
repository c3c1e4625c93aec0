"""The pipeline action IR: what one rank does, in order, for one training step.

An action names a stage, a kind and a micro-batch; its text form is `<stage><kind><mb>`:

    F   forward                          "1F3"
    B   backward (input and weights)     "1B3"
    I   backward for the input only      "0I2"   (zero-bubble split)
    W   backward for the weights only    "0W2"
    sF  send the stage's output on       "1sF3"  (added by add_communication)
    rF  receive the stage's input        "2rF3"
    sB  send the input gradient back     "2sB3"
    rB  receive the output gradient      "1rB3"

A schedule is a value - one list of actions per rank - produced by the pure generators
in schedules.py, checked and timed by check.py, executed by runtime.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPUTE = ("F", "B", "I", "W")
COMMUNICATION = ("sF", "rF", "sB", "rB")
_TEXT = re.compile(r"^(\d+)(F|B|I|W|sF|rF|sB|rB)(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in COMPUTE + COMMUNICATION:
            raise ValueError(f"unknown action kind {self.kind!r}; one of {', '.join(COMPUTE + COMMUNICATION)}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> Action:
        match = _TEXT.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not an action like 1F3, 0I2 or 2rF3")
        return Action(int(match[1]), match[2], int(match[3]))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists for `num_microbatches` micro-batches through `num_stages`
    stages; stage s lives on rank stage_to_rank[s]."""

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # by rank

    def rank_of(self, stage: int) -> int:
        return stage % self.num_ranks  # rank r holds stages r, r+p, r+2p, ...

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_stages, self.num_ranks))

    @property
    def splits_backward(self) -> bool:
        """Whether backward runs as separate input- and weight-gradient passes (I and W,
        the zero-bubble split): a compiled backward then runs twice on its saved tensors."""
        return any(a.kind == "I" for rank_actions in self.actions for a in rank_actions)

    def text(self) -> list[str]:
        """One line per rank: the actions' text forms separated by spaces."""
        return [" ".join(map(str, rank_actions)) for rank_actions in self.actions]

    @staticmethod
    def from_text(name: str, lines: list[str], num_stages: int, num_microbatches: int) -> Schedule:
        actions = tuple(tuple(Action.parse(tok) for tok in line.split()) for line in lines)
        return Schedule(name, len(lines), num_stages, num_microbatches, actions)
