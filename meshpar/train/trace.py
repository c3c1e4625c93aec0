"""`--trace DIR`: a Chrome/Perfetto trace per rank of a few steps, from torch.profiler -
what actually ran: operators, pipeline actions, the collectives meshpar waited on (each a
range named "op axis tag"), gloo's or NCCL's own work."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

FIRST_STEP, STEPS = 1, 3  # skip the first step (warm-up), trace the next three


class Tracer:
    def __init__(self, directory: str, rank: int, device: torch.device, total_steps: int):
        self.path = Path(directory) / f"rank{rank}.json"
        self.first = min(FIRST_STEP, total_steps - 1)
        self.last = min(self.first + STEPS, total_steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.active = False

    def before_step(self, step: int):
        if step == self.first:
            self.profiler.__enter__()
            self.active = True

    def after_step(self, step: int):
        if self.active and step >= self.last:
            self.close()

    def close(self):
        if self.active:
            self.profiler.__exit__(None, None, None)
            self.active = False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.path))
