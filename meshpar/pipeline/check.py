"""validate() and simulate(): a schedule checked and timed with no process group.

Both run one event engine over the per-rank action lists: an action starts when its rank
is free and its inputs exist - a forward needs the previous stage's forward of the same
micro-batch (received, if on another rank), a backward needs the next stage's backward
and its own forward, W needs its I. Sends never block; a receive waits for its send. If
no rank can move before all actions ran, the schedule deadlocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meshpar.pipeline.actions import Action, Schedule


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Costs:
    """Time units per stage: forward, backward-for-input, backward-for-weights. B = I + W."""

    forward: float = 1.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    communication: float = 0.0

    def of(self, action: Action) -> float:
        return {"F": self.forward, "B": self.backward_input + self.backward_weight,
                "I": self.backward_input, "W": self.backward_weight}.get(action.kind, self.communication)


@dataclass
class Simulation:
    timeline: list[list[tuple[float, float, Action]]]  # per rank: (start, end, action)
    total_time: float
    busy_time: list[float]  # per rank, compute only
    peak_inflight_microbatches: list[int]  # per rank: forwards whose backward has not finished

    @property
    def bubble_fraction(self) -> float:
        """Idle over total, over all ranks."""
        ranks = len(self.busy_time)
        return 1 - sum(self.busy_time) / (ranks * self.total_time) if self.total_time else 0.0

    def idle_time(self, rank: int) -> float:
        return self.total_time - self.busy_time[rank]


def _check_counts(schedule: Schedule):
    S, m = schedule.num_stages, schedule.num_microbatches
    problems = []
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            if not 0 <= a.stage < S or not 0 <= a.microbatch < m:
                problems.append(f"rank {rank}: {a} is outside {S} stages x {m} micro-batches")
            elif schedule.rank_of(a.stage) != rank:
                problems.append(f"rank {rank}: {a} belongs to rank {schedule.rank_of(a.stage)}")
        counts = Counter(a for a in actions)
        problems += [f"rank {rank}: {a} appears {n} times" for a, n in counts.items() if n > 1]
    seen = Counter((a.stage, a.kind, a.microbatch) for actions in schedule.actions for a in actions)
    for s in range(S):
        for mb in range(m):
            has = {k for k in ("F", "B", "I", "W") if seen[(s, k, mb)]}
            if "F" not in has:
                problems.append(f"stage {s} micro-batch {mb} has no forward")
            if not ({"B"} <= has or {"I", "W"} <= has) or ({"B"} <= has and has & {"I", "W"}):
                problems.append(f"stage {s} micro-batch {mb} needs one B, or one I and one W; has {sorted(has)}")
    if problems:
        raise ScheduleError("; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))


def _run(schedule: Schedule, costs: Costs) -> Simulation:
    """The event engine shared by validate() and simulate()."""
    p, last = schedule.num_ranks, schedule.num_stages - 1
    done: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> finish time
    has_comm = any(not a.is_compute for actions in schedule.actions for a in actions)
    pointer, clock = [0] * p, [0.0] * p
    timeline = [[] for _ in range(p)]
    busy = [0.0] * p
    inflight, peak = [0] * p, [0] * p

    def ready_at(a: Action) -> float | None:
        s, mb = a.stage, a.microbatch
        needs: list[tuple[int, str, int]] = []
        if a.kind == "F":
            if s > 0:
                remote = schedule.rank_of(s - 1) != schedule.rank_of(s)
                needs.append((s, "rF", mb) if remote and has_comm else (s - 1, "F", mb))
        elif a.kind in ("B", "I"):
            needs.append((s, "F", mb))
            if s < last:
                remote = schedule.rank_of(s + 1) != schedule.rank_of(s)
                needs.append((s, "rB", mb) if remote and has_comm else (s + 1, "*B", mb))
        elif a.kind == "W":
            needs.append((s, "I", mb))
        elif a.kind == "rF":
            needs.append((s - 1, "sF", mb))
        elif a.kind == "rB":
            needs.append((s + 1, "sB", mb))
        elif a.kind == "sF":
            needs.append((s, "F", mb))
        elif a.kind == "sB":
            needs.append((s, "*B", mb))
        times = []
        for need in needs:
            if need[1] == "*B":  # the input gradient exists after B or I
                t = done.get((need[0], "B", need[2]), done.get((need[0], "I", need[2])))
            else:
                t = done.get(need)
            if t is None:
                return None
            times.append(t)
        return max(times, default=0.0)

    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        moved = False
        for rank in range(p):
            while pointer[rank] < len(schedule.actions[rank]):
                a = schedule.actions[rank][pointer[rank]]
                t = ready_at(a)
                if t is None:
                    break
                start = max(clock[rank], t)
                end = start + costs.of(a)
                done[(a.stage, a.kind, a.microbatch)] = end
                clock[rank] = end
                timeline[rank].append((start, end, a))
                if a.is_compute:
                    busy[rank] += end - start
                if a.kind == "F":
                    inflight[rank] += 1
                    peak[rank] = max(peak[rank], inflight[rank])
                elif a.kind in ("B", "W"):
                    inflight[rank] -= 1
                pointer[rank] += 1
                remaining -= 1
                moved = True
        if not moved:
            stuck = [str(schedule.actions[r][pointer[r]]) for r in range(p) if pointer[r] < len(schedule.actions[r])]
            raise ScheduleError(f"{schedule.name} deadlocks: ranks wait on {', '.join(stuck)}")
    return Simulation(timeline, max(clock), busy, peak)


def _check_order(schedule: Schedule):
    for rank, actions in enumerate(schedule.actions):
        position = {a: i for i, a in enumerate(actions)}
        for a in actions:
            if a.kind in ("B", "I") and position.get(Action(a.stage, "F", a.microbatch), 1 << 30) > position[a]:
                raise ScheduleError(f"rank {rank}: {a} comes before its forward")
            if a.kind == "W" and position.get(Action(a.stage, "I", a.microbatch), 1 << 30) > position[a]:
                raise ScheduleError(f"rank {rank}: {a} comes before its I")
    sends = {(a.stage, a.kind[1], a.microbatch) for acts in schedule.actions for a in acts if a.kind in ("sF", "sB")}
    recvs = {(a.stage - 1 if a.kind == "rF" else a.stage + 1, a.kind[1], a.microbatch)
             for acts in schedule.actions for a in acts if a.kind in ("rF", "rB")}
    if sends != recvs:
        unmatched = sorted(sends ^ recvs)[:5]
        raise ScheduleError(f"unmatched sends/receives (stage, F|B, micro-batch): {unmatched}")


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless every stage and micro-batch has its F and its B (or I and
    W), each on the right rank and in order, every send has its receive, and the whole
    schedule runs to the end without deadlock."""
    _check_counts(schedule)
    _check_order(schedule)
    _run(schedule, Costs())


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Simulation:
    """Validate `schedule`, then run it on an event clock with these action costs: total
    time, bubble fraction and peak in-flight micro-batches per rank."""
    validate(schedule)
    return _run(schedule, costs)
