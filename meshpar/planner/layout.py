"""One candidate configuration: how the job is split, and what each rank then runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from meshpar.pipeline.check import Costs, simulate
from meshpar.pipeline.schedules import build_schedule

# how the dp reduction runs and where tp lies: never searched, only fixed (--fix)
FIXED_ONLY = ("grad_compression", "hierarchical", "overlap", "tp_across_nodes")
SETTINGS = ("dp", "tp", "pp", "cp", "zero", "schedule", "virtual_stages", "micro_batch_size",
            "sequence_parallel", "recompute", "offload", "ep") + FIXED_ONLY
TEXT_SETTINGS = ("schedule", "recompute", "offload", "grad_compression")
FLAG_SETTINGS = ("sequence_parallel", "hierarchical", "overlap", "tp_across_nodes")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    cp: int
    zero: int
    schedule: str  # "none" without a pipeline
    virtual_stages: int
    micro_batch_size: int
    sequence_parallel: bool
    recompute: str
    offload: str  # "none" or "optimizer"
    ep: int = 1  # expert parallelism, within dp (a mixture of experts' experts split over it)
    # the dp reduction, as `meshpar train` sets it (not searched: fixed with --fix)
    grad_compression: str = "none"  # none (fp32), bf16, fp16, int8
    hierarchical: bool = False  # ZeRO-0's all-reduce inside each node, across, inside again
    overlap: bool = True  # each bucket's reduction starts in backward
    # ranks dealt to nodes in turn (`meshpar cluster run --placement round-robin`): tp
    # groups span nodes; by default nodes hold consecutive ranks and tp stays inside one
    tp_across_nodes: bool = False

    def settings(self) -> dict:
        return asdict(self)

    def microbatches(self, global_batch: int) -> int:
        return global_batch // self.dp // self.micro_batch_size

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"cp={self.cp}", f"zero={self.zero}",
                 f"mbs={self.micro_batch_size}"] + ([f"ep={self.ep}"] if self.ep > 1 else [])
        if self.pp > 1:
            parts.append(self.schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""))
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        if self.grad_compression != "none":
            parts.append(f"grads={self.grad_compression}")
        parts += [name for name, on in (("hierarchical", self.hierarchical), ("no-overlap", not self.overlap),
                                        ("tp-across-nodes", self.tp_across_nodes)) if on]
        return " ".join(parts)


@dataclass(frozen=True)
class PipelineShape:
    bubble_fraction: float  # idle over total, with backward twice the forward
    peak_inflight: int  # micro-batch chunks whose activations the busiest rank holds


def simulated_microbatches(pp: int, microbatches: int) -> int:
    """How many micro-batches the simulator runs for a step of `microbatches`: all of
    them up to 4 per stage, else 4 per stage - past warm-up and cool-down, each further
    micro-batch adds the same work to every rank and no idle time, so the rest is
    arithmetic (tests/test_planner.py checks this against full simulations)."""
    return min(microbatches, 4 * pp)


@lru_cache(maxsize=None)
def pipeline_shape(schedule: str, pp: int, virtual_stages: int, microbatches: int) -> PipelineShape:
    """The pipeline simulator's bubble and peak in-flight micro-batches, with backward
    twice the forward (cached: they depend on the schedule's shape only)."""
    if pp == 1:
        return PipelineShape(0.0, 1)
    simulated = simulated_microbatches(pp, microbatches)
    sim = simulate(build_schedule(schedule, pp, virtual_stages, simulated),
                   Costs(forward=1.0, backward_input=1.0, backward_weight=1.0))
    work = 3 * virtual_stages  # F + I + W per micro-batch and chunk, on every rank
    total = sim.total_time + work * (microbatches - simulated)
    return PipelineShape(1 - work * microbatches / total, max(sim.peak_inflight_microbatches))
