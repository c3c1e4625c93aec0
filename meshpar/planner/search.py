"""Search: every layout the cluster and job allow, each predicted, ranked by step time
(those that fit first), and the winner explained against its runners-up."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from meshpar.mesh import divisors
from meshpar.parallel.zero.options import STAGES
from meshpar.planner.hardware import Cluster
from meshpar.planner.layout import FIXED_ONLY, FLAG_SETTINGS, SETTINGS, TEXT_SETTINGS, Layout
from meshpar.planner.memory import Dtypes, memory_bytes
from meshpar.planner.model import ModelSpec
from meshpar.planner.step_time import step_time

SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1")
RECOMPUTES = ("none", "selective", "full")
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass
class Candidate:
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float]
    fits: bool
    tokens_per_s: float
    mfu: float
    cost_per_million_tokens: float | None

    def to_json(self) -> dict:
        return {**self.layout.settings(), "memory_bytes": {k: int(v) for k, v in self.memory.items()},
                "fits": self.fits, "step_time_s": self.time["total"],
                "step_time_breakdown_s": self.time, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "cost_per_million_tokens": self.cost_per_million_tokens}


def _chunk_counts(layers: int, pp: int) -> list[int]:
    """The interleaved schedule's chunks per rank: every count of 2 or more that divides
    the busiest stage's layers, ceil(layers / pp) - the stages need not be equal (126
    layers over 16 stages: 8 on the busiest, chunks of 4, 2 or 1)."""
    per_stage = -(-layers // pp)
    return [v for v in divisors(per_stage) if v >= 2 and pp * v <= layers]


def parse_fix(text: str | None) -> dict:
    """'tp=8,pp=16,zero=1,recompute=selective' -> typed settings; ValueError names the keys."""
    fixed: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in SETTINGS or not value:
            raise ValueError(f"--fix {item!r}: use key=value with keys {', '.join(SETTINGS)}")
        if key in TEXT_SETTINGS:
            fixed[key] = value
        elif key in FLAG_SETTINGS:
            if value.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise ValueError(f"--fix {key}={value}: use true or false")
            fixed[key] = value.lower() in ("true", "1", "on")
        else:
            try:
                fixed[key] = int(value)
            except ValueError:
                raise ValueError(f"--fix {key}={value}: expected an integer") from None
    return fixed


def layouts(spec: ModelSpec, cluster: Cluster, global_batch: int, fixed: dict | None = None):
    """Every valid layout, with the fixed settings held."""
    fixed = fixed or {}

    def choices(key, values):
        return [fixed[key]] if key in fixed else list(values)

    node = cluster.gpus_per_node
    for tp in choices("tp", [d for d in divisors(node) if spec.heads % d == 0]):
        for cp in choices("cp", [d for d in divisors(cluster.gpus // tp) if spec.seq_len % (2 * d) == 0]):
            for pp in choices("pp", [d for d in divisors(cluster.gpus // (tp * cp)) if d <= spec.layers]):
                if tp * cp * pp > cluster.gpus or cluster.gpus % (tp * cp * pp):
                    continue
                dp = cluster.gpus // (tp * cp * pp)
                if fixed.get("dp", dp) != dp or global_batch % dp:
                    continue
                schedules = [("none", 1)] if pp == 1 else \
                    [(sch, v) for sch in SCHEDULES for v in (_chunk_counts(spec.layers, pp)
                                                             if sch == "interleaved-1f1b" else (1,))]
                eps = [e for e in divisors(dp) if spec.experts % e == 0] if spec.experts else [1]
                for (schedule, v), mbs, zero, sp, recompute, offload, ep in itertools.product(
                        schedules, choices("micro_batch_size", MICRO_BATCH_SIZES), choices("zero", STAGES),
                        choices("sequence_parallel", (False, True) if tp > 1 and not spec.experts else (False,)),
                        choices("recompute", RECOMPUTES), choices("offload", ("none", "optimizer")),
                        choices("ep", eps)):
                    if fixed.get("schedule", schedule) != schedule or fixed.get("virtual_stages", v) != v:
                        continue
                    if (global_batch // dp) % mbs or (sp and spec.seq_len // cp % tp):
                        continue
                    m = global_batch // dp // mbs
                    if schedule == "interleaved-1f1b" and m % pp:
                        continue
                    if dp % ep or (spec.experts and spec.experts % ep) or (ep > 1 and not spec.experts):
                        continue
                    yield Layout(dp, tp, pp, cp, zero, schedule, v, mbs, sp, recompute, offload, ep,
                                 **{k: fixed[k] for k in FIXED_ONLY if k in fixed})


def evaluate(spec: ModelSpec, layout: Layout, cluster: Cluster, global_batch: int, dtypes: Dtypes,
             gpu_hour_price: float | None = None) -> Candidate:
    memory = memory_bytes(spec, layout, global_batch, dtypes)
    time = step_time(spec, layout, cluster, global_batch, dtypes)
    tokens_per_s = global_batch * spec.seq_len / time["total"]
    mfu = spec.flops_per_token() * tokens_per_s / (cluster.gpus * cluster.gpu.peak_tflops * 1e12)
    cost = None if gpu_hour_price is None else gpu_hour_price * cluster.gpus / 3600 * 1e6 / tokens_per_s
    return Candidate(layout, memory, time, memory["total"] <= cluster.gpu.memory_bytes, tokens_per_s, mfu, cost)


def plan(spec: ModelSpec, cluster: Cluster, global_batch: int, dtypes: Dtypes = Dtypes(),
         fixed: dict | None = None, gpu_hour_price: float | None = None) -> list[Candidate]:
    """Every candidate, those that fit first - fastest first, then the smaller - then
    those that do not, the nearest to fitting first."""
    candidates = [evaluate(spec, layout, cluster, global_batch, dtypes, gpu_hour_price)
                  for layout in layouts(spec, cluster, global_batch, fixed)]
    return sorted(candidates, key=lambda c: (not c.fits, round(c.time["total"], 9) if c.fits else 0,
                                             c.memory["total"]))


def explain(candidates: list[Candidate], runners_up: int = 3) -> list[str]:
    """Why the first candidate beats the next few: the parts of the step time (or of the
    memory) where they differ most."""
    if not candidates:
        return []
    best = candidates[0]
    lines = [f"winner: {best.layout.describe()}: step {best.time['total']:.3f} s, "
             f"{best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}, "
             f"{best.memory['total'] / 2**30:.1f} GiB per GPU" + ("" if best.fits else " (does not fit)")]
    for other in candidates[1:1 + runners_up]:
        if other.fits != best.fits:
            lines.append(f"  over {other.layout.describe()}: that one does not fit "
                         f"({other.memory['total'] / 2**30:.1f} GiB)")
            continue
        deltas = sorted(((other.time[k] - best.time[k], k) for k in best.time if k != "total"), reverse=True)
        gains = ", ".join(f"{k} {d * 1e3:+.1f} ms" for d, k in deltas if abs(d) > 1e-4 * best.time["total"])
        memory = (other.memory["total"] - best.memory["total"]) / 2**30
        lines.append(f"  over {other.layout.describe()} ({other.time['total'] / best.time['total'] - 1:+.1%} "
                     f"step time, {memory:+.1f} GiB): it spends "
                     + (gains or "the same time in every part; the winner needs less memory")
                     + ("" if not gains else " (its time minus the winner's)"))
    return lines
