"""The pipeline's options and its rules, the asynchronous schedule's exclusions among them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshpar.options import Section, comma_list, option
from meshpar.pipeline.schedules import GENERATORS, async_min_microbatches
from meshpar.pipeline.split import split_problems

if TYPE_CHECKING:
    from meshpar.config import Config


@dataclass
class PipelineOptions(Section):
    """Pipeline parallelism over pp (its degree is the mesh's)."""

    schedule: str = option("1f1b", "pipeline schedule (async: PipeDream-2BW's delayed update, one stream over "
                                   "the whole run)", choices=GENERATORS)
    virtual_stages: int = option(1, "pipeline chunks per rank, for interleaved-1f1b", at_least=1)
    pp_layers: list[int] | None = option(None, "layers per pipeline stage, e.g. 3,3,2 (default: balanced by cost)",
                                         parse=comma_list(int, "layer counts like 3,3,2"))

    def asynchronous(self, cfg: Config) -> bool:
        """Whether the run is PipeDream-2BW's delayed update: async over pp above 1."""
        return self.schedule == "async" and cfg.mesh.pp > 1

    def problems(self, cfg: Config) -> list[str]:
        pp, m = cfg.mesh.pp, cfg.microbatches()
        problems = []
        model = cfg.model_config()
        if model is not None and pp >= 1 and self.virtual_stages >= 1:
            problems += split_problems(model, pp * self.virtual_stages, self.pp_layers)
        if self.schedule == "async" and pp == 1:
            problems.append("--schedule async pipelines across ranks; it needs --pp above 1")
        elif self.asynchronous(cfg):
            problems += self._async_problems(cfg, m)
        if self.virtual_stages > 1 and self.schedule != "interleaved-1f1b":  # async's too: it ran, wrongly
            problems.append(f"--virtual-stages {self.virtual_stages} needs --schedule interleaved-1f1b "
                            f"({self.schedule} runs one stage per rank)")
        elif self.schedule == "interleaved-1f1b" and pp >= 1 and m is not None and m % pp:
            problems.append(f"interleaved-1f1b needs the micro-batches per step ({m}) to be a multiple of "
                            f"--pp={pp}; change --micro-batch-size")
        return problems

    def _async_problems(self, cfg, m: int | None) -> list[str]:
        """What the async schedule cannot run with: it keeps whole weight snapshots per
        batch in flight, and a batch's backwards span two steps."""
        pp, problems = cfg.mesh.pp, []
        fewest = async_min_microbatches(pp)
        if m is not None and m < fewest:
            problems.append(f"--schedule async at --pp {pp} needs at least {fewest} micro-batches per step "
                            f"(it has {m}): with fewer, the first ranks' warm-up runs the next step's forwards "
                            f"first and a batch's last backwards come after its gradient is applied; use a "
                            f"smaller --micro-batch-size or a larger --global-batch-size")
        if cfg.zero.stage != 0:
            problems.append(f"--zero {cfg.zero.stage} with --schedule async is not supported: the async schedule "
                            f"keeps whole weight snapshots per batch in flight, which sharded states would not "
                            f"see; use --zero 0 or another schedule")
        if cfg.zero.offload:
            problems.append("--offload with --schedule async is not supported; use another schedule")
        if cfg.reduce.grad_compression != "none":
            problems.append("--grad-compression with --schedule async is not supported; use another schedule")
        if cfg.precision.precision == "fp16":
            problems.append("--precision fp16 with --schedule async is not supported: a batch's backwards span "
                            "two steps, between which the loss scale may change; use bf16")
        if cfg.recompute.recompute not in ("none", []):
            problems.append("--recompute with --schedule async is not supported: the async schedule runs each "
                            "batch on its own weight snapshot, which recomputation in backward would not see")
        if cfg.checkpoint.save_dir:
            problems.append("--save-dir with --schedule async is not supported: between two steps the async "
                            "schedule holds a batch's gradient half applied; use another schedule")
        return problems
