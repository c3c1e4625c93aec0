"""Pure schedule generators: functions of (p ranks, v virtual stages per rank, m
micro-batches) that return a Schedule of compute actions; `add_communication` adds the
sends and receives. Nothing here touches a process group."""

from __future__ import annotations

from meshpar.pipeline.actions import Action, Schedule


def naive(p: int, v: int, m: int) -> Schedule:
    """One micro-batch through the whole pipe, forward and backward, before the next."""
    _require_one_chunk("naive", v)
    return _schedule("naive", p, 1, m, [[a for mb in range(m) for a in (Action(r, "F", mb), Action(r, "B", mb))]
                                        for r in range(p)])


def gpipe(p: int, v: int, m: int) -> Schedule:
    """Huang et al. 2019: every forward, then every backward (m micro-batches in flight)."""
    _require_one_chunk("gpipe", v)
    return _schedule("gpipe", p, 1, m, [[Action(r, "F", mb) for mb in range(m)]
                                        + [Action(r, "B", mb) for mb in range(m)] for r in range(p)])


def one_f_one_b(p: int, v: int, m: int) -> Schedule:
    """PipeDream-flush / Megatron 1F1B: rank r runs p-r-1 warm-up forwards, then
    alternates one forward and one backward, then drains: at most p-r in flight."""
    _require_one_chunk("1f1b", v)
    ranks = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action(r, "F", mb) for mb in range(warmup)]
        for i in range(m - warmup):
            actions += [Action(r, "F", warmup + i), Action(r, "B", i)]
        actions += [Action(r, "B", mb) for mb in range(m - warmup, m)]
        ranks.append(actions)
    return _schedule("1f1b", p, 1, m, ranks)


def interleaved_one_f_one_b(p: int, v: int, m: int) -> Schedule:
    """Narayanan et al. 2021: rank r holds chunks r, r+p, ...; micro-batches advance in
    groups of p per chunk; warm-up (p-r-1)*2 + (v-1)*p forwards. Needs m a multiple of p."""
    if m % p:
        raise ValueError(f"interleaved-1f1b needs the micro-batches ({m}) to be a multiple of "
                         f"the pipeline ranks ({p})")
    total = m * v

    def chunk_and_mb(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (chunk if forward else v - 1 - chunk), (k // (p * v)) * p + k % p

    ranks = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)

        def forward(k):
            c, mb = chunk_and_mb(k, True)
            return Action(c * p + r, "F", mb)

        def backward(k):
            c, mb = chunk_and_mb(k, False)
            return Action(c * p + r, "B", mb)

        actions = [forward(k) for k in range(warmup)]
        for i in range(total - warmup):
            actions += [forward(warmup + i), backward(i)]
        actions += [backward(k) for k in range(total - warmup, total)]
        ranks.append(actions)
    return _schedule("interleaved-1f1b", p, v, m, ranks)


def zero_bubble_h1(p: int, v: int, m: int) -> Schedule:
    """Qi et al. 2023, ZB-H1: 1F1B's order and memory with the backward split into I
    (input gradient, on the critical path) and W (weight gradient, which waits). Rank r
    keeps 1F1B's p-r-1 warm-up forwards; in the steady state it defers r weight passes,
    which fill the drain where 1F1B idles. Bubble (p-1)(T_F + T_I - T_W)."""
    _require_one_chunk("zb-h1", v)
    ranks = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action(r, "F", mb) for mb in range(warmup)]
        deferred = 0
        next_w = 0
        for i in range(m - warmup):
            actions += [Action(r, "F", warmup + i), Action(r, "I", i)]
            if deferred < r:  # hold back up to r W's for the drain
                deferred += 1
            else:
                actions.append(Action(r, "W", next_w))
                next_w += 1
        for mb in range(m - warmup, m):
            actions.append(Action(r, "I", mb))
            actions.append(Action(r, "W", next_w))
            next_w += 1
        actions += [Action(r, "W", mb) for mb in range(next_w, m)]
        ranks.append(actions)
    return _schedule("zb-h1", p, 1, m, ranks)


def asynchronous(p: int, v: int, m: int, num_steps: int = 2) -> Schedule:
    """PipeDream-2BW (Narayanan et al. 2021) without a flush: one 1F1B stream over the
    micro-batches of `num_steps` consecutive steps (m each); step t's forwards start while
    step t-1's last backwards are still in flight. The runtime cuts the stream into steps
    and keeps two weight versions; see docs/pipeline.md for exactly what it computes."""
    _require_one_chunk("async", v)
    stream = one_f_one_b(p, 1, m * num_steps)
    return Schedule("async", p, p, m * num_steps, stream.actions)


def step_start(actions: tuple[Action, ...], step: int, m: int) -> int:
    """Where step `step` begins in a rank's async stream of m micro-batches per step: at
    the forward of its first micro-batch (or that forward's receive); the end if none."""
    if step == 0:
        return 0
    return next((i for i, a in enumerate(actions) if a.kind in ("rF", "F") and a.microbatch == step * m),
                len(actions))


def async_steps_complete(p: int, m: int) -> bool:
    """Whether the async stream of p ranks, cut into steps of m micro-batches at each
    step's first forward (`step_start`, as the runtime cuts it), lets every rank finish each batch's
    backwards within the next step, at whose end its gradient is applied. With few
    micro-batches an early rank's warm-up runs a later step's forwards first and pushes
    a batch's last backwards past that point (p=4 with m=2: rank 0's last backward of
    batch 0 runs after step 1 ended). Steady from the second batch on: four steps tell."""
    steps = 4
    for actions in asynchronous(p, 1, m, steps).actions:
        starts = [step_start(actions, t, m) for t in range(steps)] + [len(actions)]
        for batch in range(steps - 1):
            done_by = starts[batch + 2]  # the end of step batch + 1
            if any(a.kind == "B" and a.microbatch // m == batch for a in actions[done_by:]):
                return False
    return True


def async_min_microbatches(p: int) -> int:
    """The fewest micro-batches per step with which the async schedule runs on p ranks."""
    return next(m for m in range(1, 4 * p) if async_steps_complete(p, m))


GENERATORS = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_one_f_one_b,
    "zb-h1": zero_bubble_h1,
    "async": asynchronous,
}


def build_schedule(name: str, p: int, v: int, m: int, communication: bool = True) -> Schedule:
    """The schedule `name` for p ranks, v chunks per rank and m micro-batches, as data
    (each rank's list of actions), with sends and receives added unless `communication`
    is False. ValueError names the valid choices."""
    if name not in GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(GENERATORS)}")
    schedule = GENERATORS[name](p, v, m)
    return add_communication(schedule) if communication else schedule


def add_communication(schedule: Schedule) -> Schedule:
    """Insert a receive before each compute action that needs another rank's tensor and a
    send after each that produces one. Neighbouring stages on the same rank pass
    tensors locally and get neither."""
    last = schedule.num_stages - 1
    out = []
    for rank_actions in schedule.actions:
        actions = []
        for a in rank_actions:
            s, mb = a.stage, a.microbatch
            crosses_forward = s < last and schedule.rank_of(s + 1) != schedule.rank_of(s)
            crosses_backward = s > 0 and schedule.rank_of(s - 1) != schedule.rank_of(s)
            if a.kind == "F" and s > 0 and schedule.rank_of(s - 1) != schedule.rank_of(s):
                actions.append(Action(s, "rF", mb))
            if a.kind in ("B", "I") and s < last and crosses_forward:
                actions.append(Action(s, "rB", mb))
            actions.append(a)
            if a.kind == "F" and crosses_forward:
                actions.append(Action(s, "sF", mb))
            if a.kind in ("B", "I") and crosses_backward:
                actions.append(Action(s, "sB", mb))
        out.append(tuple(actions))
    return Schedule(schedule.name, schedule.num_ranks, schedule.num_stages, schedule.num_microbatches,
                    tuple(out))


def _require_one_chunk(name: str, v: int):
    if v != 1:
        raise ValueError(f"{name} runs one stage per rank; --virtual-stages {v} needs interleaved-1f1b")


def _schedule(name: str, p: int, v: int, m: int, ranks: list[list[Action]]) -> Schedule:
    return Schedule(name, p, p * v, m, tuple(tuple(r) for r in ranks))
