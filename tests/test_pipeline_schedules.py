"""Schedules as data: the generators validate over a grid, the simulator reproduces the
published bubble formulas exactly, and validate() catches broken schedules."""

import pytest

from meshpar.pipeline.actions import Action, Schedule
from meshpar.pipeline.check import Costs, ScheduleError, simulate, validate
from meshpar.pipeline.schedules import GENERATORS, add_communication, build_schedule

UNIT = Costs(forward=1, backward_input=1, backward_weight=1)


def legal(name, p, v, m):
    if name == "interleaved-1f1b":
        return m % p == 0
    return v == 1


def test_every_generator_validates_over_the_grid():
    checked = 0
    for name in GENERATORS:
        for p in range(1, 9):
            for v in range(1, 5):
                for m in range(1, 4 * p + 1):
                    if legal(name, p, v, m):
                        validate(build_schedule(name, p, v, m))
                        validate(build_schedule(name, p, v, m, communication=False))
                        checked += 1
    assert checked > 500


def test_illegal_combinations_name_the_rule():
    with pytest.raises(ValueError, match="multiple of the pipeline ranks"):
        build_schedule("interleaved-1f1b", 4, 2, 6)
    with pytest.raises(ValueError, match="needs interleaved-1f1b"):
        build_schedule("1f1b", 4, 2, 8)
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'; choose one of naive, gpipe"):
        build_schedule("pipedream", 2, 1, 2)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 4), (4, 16), (8, 3), (8, 32)])
def test_gpipe_and_1f1b_bubble(name, p, m):
    sim = simulate(build_schedule(name, p, 1, m), UNIT)
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    peak = sim.peak_inflight_microbatches
    if name == "gpipe":
        assert peak == [m] * p
    else:
        assert peak == [min(p - r, m) for r in range(p)] and max(peak) <= p


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (4, 4, 4), (8, 2, 16), (3, 3, 9)])
def test_interleaved_bubble_over_ideal_time(p, v, m):
    sim = simulate(build_schedule("interleaved-1f1b", p, v, m), UNIT)
    ideal = m * v * 3  # each rank runs m micro-batches through v chunks, F + I + W = 3
    assert (sim.total_time - ideal) / ideal == pytest.approx((p - 1) / (v * m))


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 12), (8, 16)])
@pytest.mark.parametrize("costs", [UNIT, Costs(2, 2, 1), Costs(1, 2, 1)])
def test_zero_bubble_h1(p, m, costs):
    sim = simulate(build_schedule("zb-h1", p, 1, m), costs)
    expected_idle = (p - 1) * (costs.forward + costs.backward_input - costs.backward_weight)
    for r in range(p):
        assert sim.idle_time(r) == pytest.approx(expected_idle)
    assert max(sim.peak_inflight_microbatches) <= p  # the memory of 1F1B
    one_f_one_b = simulate(build_schedule("1f1b", p, 1, m), costs)
    if costs == UNIT:  # a third of 1F1B's bubble when F, I and W cost the same
        assert sim.idle_time(0) == pytest.approx(one_f_one_b.idle_time(0) / 3)


def test_text_form_round_trips():
    schedule = build_schedule("interleaved-1f1b", 2, 2, 4)
    again = Schedule.from_text(schedule.name, schedule.text(), schedule.num_stages, schedule.num_microbatches)
    assert again == schedule
    assert str(Action.parse("12rF3")) == "12rF3"
    with pytest.raises(ValueError, match="not an action"):
        Action.parse("1X3")


def test_communication_pass():
    schedule = build_schedule("1f1b", 2, 1, 2)
    assert schedule.text() == ["0F0 0sF0 0F1 0sF1 0rB0 0B0 0rB1 0B1",
                               "1rF0 1F0 1B0 1sB0 1rF1 1F1 1B1 1sB1"]
    # p=1 with chunks: neighbouring stages on one rank pass tensors locally
    local = build_schedule("interleaved-1f1b", 1, 2, 2)
    assert all(a.is_compute for a in local.actions[0])


def broken(lines, stages=2, m=2):
    return add_communication(Schedule.from_text("broken", lines, stages, m))


def test_validate_catches_deadlock_missing_work_and_order():
    with pytest.raises(ScheduleError, match="deadlocks"):
        # rank 0 waits for backward 0 before sending forward 1, which rank 1 needs first
        validate(broken(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"]))
    with pytest.raises(ScheduleError, match="micro-batch 1 has no forward"):
        validate(broken(["0F0 0B0 0B1", "1F0 1B0 1F1 1B1"]))
    with pytest.raises(ScheduleError, match="comes before its forward"):
        validate(Schedule.from_text("x", ["0B0 0F0"], 1, 1))
    with pytest.raises(ScheduleError, match="belongs to rank 1"):
        validate(Schedule.from_text("x", ["0F0 1F0 0B0 1B0", ""], 2, 1))
    with pytest.raises(ScheduleError, match="unmatched"):
        validate(Schedule.from_text("x", ["0F0 0sF0 0rB0 0B0", "1F0 1B0 1sB0"], 2, 1))


def test_simulate_command(capsys, tmp_path):
    import json

    from meshpar.cli import main

    assert main(["simulate", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_time"] == (8 + 3) * 3
    assert out["bubble_fraction"] == pytest.approx(3 / 11)
    assert out["peak_inflight_microbatches"] == [4, 3, 2, 1]

    png = tmp_path / "zb.png"
    assert main(["simulate", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4",
                 "--png", str(png)]) == 0
    grid = capsys.readouterr().out
    assert grid.startswith("rank 0 | F0 F1") and "W3" in grid
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["simulate", "--schedule", "interleaved-1f1b", "--stages", "3", "--virtual-stages", "2",
                 "--microbatches", "4"]) == 2
    assert "multiple of the pipeline ranks (3)" in capsys.readouterr().err


def test_stages_are_balanced_by_the_blocks_matrices_the_last_paying_for_the_output():
    """Any plan's blocks are split by their matrices' elements (shapes only: a meta model
    will do); meshpar's Llama's cost is its analytic count, 2h^2 + 2h kv + 3h ffn per
    layer and vocab x h for the output layer."""
    from meshpar.model import build_model
    from meshpar.model.config import model_config
    from meshpar.parallel.llama_plan import llama_plan
    from meshpar.pipeline.split import balanced_split, stage_costs

    cfg = model_config("tiny", num_layers=8, vocab_size=4096)
    costs, last = stage_costs(build_model(cfg, 0, "meta"), llama_plan(cfg).pipeline)
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    assert costs == [2 * h * h + 2 * h * kv + 3 * h * cfg.ffn_hidden_size] * 8 and last == cfg.vocab_size * h
    assert balanced_split(costs, 0, 2) == [4, 4]
    counts = balanced_split(costs, last, 2)
    assert sum(counts) == 8 and counts[1] < counts[0]  # the output layer weighs on the last stage
    assert max(sum(costs[:counts[0]]), sum(costs[counts[0]:]) + last) == min(
        max(sum(costs[:k]), sum(costs[k:]) + last) for k in range(1, 8))  # the best cut


def test_the_async_stream_completes_each_batch_within_the_next_step_from_p_minus_1_microbatches():
    """Cut at each step's first forward, the async stream finishes batch t's backwards
    within step t + 1 on every rank exactly when there are at least p - 1 micro-batches
    per step (the issue's failures, pp4 at 1-2 and pp8 at 1-4, among the rest)."""
    from meshpar.pipeline.schedules import async_min_microbatches, async_steps_complete

    for p in range(2, 9):
        assert [m for m in range(1, 2 * p + 1) if async_steps_complete(p, m)] == list(range(max(1, p - 1), 2 * p + 1))
        assert async_min_microbatches(p) == max(1, p - 1)
