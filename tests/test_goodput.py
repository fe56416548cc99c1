"""benchmarks/goodput.py's harness: the schedules it draws, what it bills, how it reads a
side's log and how it decides its verdicts (in-process, no Ray, no torch)."""

from __future__ import annotations

import math

from benchmarks.goodput import (
    Outage,
    Result,
    Schedule,
    Work,
    poisson_schedule,
    summarize,
    trace_schedule,
    verdicts,
)


def test_poisson_schedule_is_drawn_once_per_seed_and_keeps_slots_apart() -> None:
    a = poisson_schedule(3, workers=2, per_hour=360, delay=3.0, horizon=3600)
    assert a.outages == poisson_schedule(3, 2, 360, 3.0, 3600).outages  # same seed, same draw
    assert a.outages != poisson_schedule(4, 2, 360, 3.0, 3600).outages
    for slot in (0, 1):
        mine = [o for o in a.outages if o.slot == slot]
        assert all(math.isclose(o.up - o.down, 3.0, abs_tol=2e-3) for o in mine)
        assert all(b.down >= o.up for o, b in zip(mine, mine[1:]))  # a slot fails while up
        # 360/h over the ~3600 s up: about 360 failures, within 4 standard deviations
        assert abs(len(mine) - 360 * (3600 - 3 * len(mine)) / 3600) < 4 * math.sqrt(360)


def test_trace_schedule_follows_the_price_against_the_bid() -> None:
    s = trace_schedule(1, workers=2, bid=0.2, time_scale=600, delay=3.0, horizon=600)
    assert s.outages, "a synthetic day has spikes above 0.2 $/h"
    for o in s.outages:
        assert s.price_at(o.slot, o.down) > 0.2  # dies when the price passes the bid
        assert o.up >= o.down + 3.0 - 1e-6
        assert s.price_at(o.slot, o.up) <= 0.2  # back only at or below the bid
    times, prices = s.zones[0]
    assert all(not s.up_at(0, t) for t, p in zip(times, prices) if p > 0.2 and t <= 590)


def test_cost_bills_the_machines_that_are_up() -> None:
    s = Schedule("poisson", [Outage(1, 10.0, 20.0)], price=3.6)  # 0.001 $ per second
    # 2 machines for 10 s of start-up and 30 s of training, slot 1 down for 10 s: 70 s
    assert math.isclose(s.cost(2, -10.0, 30.0), 0.07, rel_tol=1e-6)


def test_summarize_reads_times_from_the_first_step_and_the_budget() -> None:
    work, t0 = Work(budget=640, target=0.9), 1000.0
    steps = [{"t": t0 + i, "step": i, "n": 2, "samples": 64 * i} for i in range(1, 11)]
    steps[4]["acc"], steps[7]["acc"] = 0.85, 0.91
    raw = {"launch": t0 - 5.0, "t0": t0, "steps": steps, "redone": 3,
           "applied": [(2.5, "kill", 0), (20.0, "kill", 1)]}
    r = summarize("torchft", 0, raw, work, Schedule("poisson", [], price=3.6))
    assert (r.startup_s, r.to_target_s, r.to_budget_s) == (5.0, 8.0, 10.0)
    assert r.samples_per_s == 64.0 and r.redone == 3 and r.reached
    assert math.isclose(r.usd, 2 * 15 * 0.001)
    assert r.notes.startswith("1 machines lost")  # the kill after the end is not counted
    failed = summarize("squall", 0, {"error": "boom"}, work, Schedule("poisson", []))
    assert not failed.reached and "boom" in failed.notes


def test_verdicts_come_from_the_medians_and_can_fail() -> None:
    def runs(side: str, targets: list[float]) -> list[Result]:
        startup = 20.0 if side == "squall" else 1.0
        return [Result(side, i, startup, to_target_s=t, samples_per_s=100.0, usd=0.01)
                for i, t in enumerate(targets)]

    fast = {"squall": runs("squall", [10, 11, 12]), "torchft": runs("torchft", [20, 9, 30])}
    assert ("squall's median time to target <= torchft (gloo, heal from a peer)'s", True,
            "11.0 vs 20.0") in verdicts(fast)
    slow = {"squall": runs("squall", [40, 41, math.nan]), "torchft": runs("torchft", [20, 9, 30])}
    held = {claim: ok for claim, ok, _ in verdicts(slow)}
    assert held["squall's median time to target <= torchft (gloo, heal from a peer)'s"] is False
    never = {"squall": runs("squall", [math.nan] * 3), "torchft": runs("torchft", [5] * 3)}
    assert [n for c, _, n in verdicts(never) if "time to target" in c] == ["never vs 5.0"]
    launch = [(ok, n) for claim, ok, n in verdicts(fast) if "launch" in claim]
    assert launch == [(False, "31.0 vs 21.0")]  # squall's slower start-up turns it over
