"""squall plan: the volatile-instances math against slow independent references (Monte Carlo with
a fixed seed, direct sums), the choice of the cheapest feasible plan, argument checks, and one
short `plan --check` on the simulated spot pool (the slow test of this module, marked below)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from cloud.traces import PriceTrace
from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.planner import (
    ErrorModel,
    Market,
    Phase,
    Plan,
    Startup,
    StepTime,
    binomial_moments,
    candidate_plans,
    choose,
    estimate_phase,
    fit_error_model,
    fit_step_time,
    parse_plan_args,
    price_below,
    replay_live_workers,
    slot_availability,
    steps_for_target,
)


@pytest.mark.parametrize("n, p", [(1, 0.9), (4, 0.95), (8, 0.5), (16, 0.2)])
def test_binomial_moments_match_monte_carlo(n, p):
    rng = np.random.default_rng(0)
    y = rng.binomial(n, p, size=400_000)
    alive = y[y >= 1]
    e_y, e_inv, p_any = binomial_moments(n, p)
    assert e_y == pytest.approx(y.mean(), rel=0.01)
    assert e_inv == pytest.approx((1 / alive).mean(), rel=0.01)
    assert p_any == pytest.approx((y >= 1).mean(), abs=0.003)
    assert e_inv >= 1 / (e_y / p_any) - 1e-12  # Jensen: E[1/y] >= 1/E[y] (given y >= 1)


def test_binomial_moments_by_hand():
    # n=2, p=1/2: P(y=1)=1/2, P(y=2)=1/4, so E[1/y | y>=1] = (1/2 + 1/8) / (3/4) = 5/6
    assert binomial_moments(2, 0.5) == pytest.approx((1.0, 5 / 6, 0.75))


@pytest.mark.parametrize("q, wait, start", [(0.05, 0, 0), (0.05, 3, 4), (0.2, 1, 0),
                                            (0.02, 0, 10)])
def test_slot_availability_matches_a_simulation_of_the_pool(q, wait, start):
    """Slots simulated step by step: working, reclaimed with probability q (no answer in that
    step), `wait` steps without a machine, `start` billed steps starting, working again."""
    steps, slots = 60, 40_000
    rng = np.random.default_rng(1)
    down_left = np.zeros(slots, dtype=int)  # steps still down; 0 = working
    answered, billed = np.zeros(steps), np.zeros(steps)
    for j in range(steps):
        working = down_left == 0
        starting = (down_left > 0) & (down_left <= start)
        hit = working & (rng.random(slots) < q)
        answered[j] = (working & ~hit).mean()
        billed[j] = (working | starting).mean()
        down_left = np.where(down_left > 0, down_left - 1, 0)
        down_left[hit] = wait + start
    got_answer, got_billed = slot_availability(q, steps, wait, start)
    np.testing.assert_allclose(got_answer, answered, atol=0.012)
    np.testing.assert_allclose(got_billed, billed, atol=0.012)


@pytest.mark.parametrize("q, d", [(0.05, 0), (0.05, 4), (0.2, 2)])
def test_the_replay_on_the_pools_draws_averages_to_slot_availability(q, d):
    """replay_live_workers (the model on the pool's per-step draws, what a held-clock run
    logs) has slot_availability's expectation, step by step, over many seeds."""
    n, steps, seeds = 4, 40, 2000
    runs = np.array([replay_live_workers(seed, q, d, n, steps) for seed in range(seeds)])
    answer, _ = slot_availability(q, steps, wait=d, start=0)
    np.testing.assert_allclose(runs.mean(axis=0), n * answer, atol=0.06)
    assert runs.max() <= n and runs[:, 0].mean() == pytest.approx(n * (1 - q), abs=0.03)


def test_without_repair_delay_the_pool_is_the_papers_model():
    """Reclaimed slots come back at once: y ~ Binomial(n, 1 - q) in every step."""
    answer, billed = slot_availability(0.1, 20, 0, 0)
    np.testing.assert_allclose(answer, 0.9)
    np.testing.assert_allclose(billed, 1.0)


def test_estimate_without_preemption_is_plain_arithmetic():
    market = Market(spot_price=0.36, on_demand_price=1.8)
    t, s = StepTime(0.01, 0.005), Startup(2.0, 0.5, 7.0)
    e = estimate_phase(Phase(4), 100, market, t, s)
    step = 0.01 + 0.005 * 4
    billed = 2.0 + 0.5 * 4
    assert e.updates == pytest.approx(100) and e.y_sum == pytest.approx(400)
    assert e.inv_y_sum == pytest.approx(100 / 4)
    assert e.time_s == pytest.approx(7.0 + billed + 100 * step)
    assert e.cost_usd == pytest.approx(4 * (billed + 100 * step) * 0.36 / 3600)
    assert e.on_demand_cost_usd == pytest.approx(4 * (billed + 100 * step) * 1.8 / 3600)


def _trace() -> PriceTrace:
    # 0.1 for 2 h, 0.3 for 1 h, 0.5 for 1 h (the last point only closes the interval)
    return PriceTrace([0, 7200, 10800, 14400], [0.1, 0.3, 0.5, 0.5], "m5.large")


def test_price_cdf_and_mean_paid_price():
    f, paid = price_below(_trace(), 0.3)
    assert f == pytest.approx(0.75, abs=1e-3) and paid == pytest.approx((2 * 0.1 + 0.3) / 3,
                                                                        rel=1e-3)
    assert price_below(_trace(), 0.05) == (0.0, 0.0)


def test_two_level_bids_match_sampling_the_trace():
    """n1 = 2 workers bid 0.4, n2 = 2 bid 0.2: y = 4 while price <= 0.2, 2 while <= 0.4."""
    trace = _trace()
    market = Market(0.1, 1.0, trace=trace)
    phase = Phase(4, bid=0.4, low=2, low_bid=0.2)
    e = estimate_phase(phase, 1, market, StepTime(1.0, 0.0), Startup())
    rng = np.random.default_rng(2)
    prices = np.array([trace.price_at(t) for t in rng.uniform(0, trace.duration, 20_000)])
    y = np.where(prices <= 0.2, 4, np.where(prices <= 0.4, 2, 0))
    assert e.y_sum == pytest.approx(y.mean(), abs=0.05)
    assert e.updates == pytest.approx((y >= 1).mean(), abs=0.01)
    assert e.inv_y_sum == pytest.approx((1 / y[y >= 1]).mean(), abs=0.01)
    cost_per_s = (np.where(prices <= 0.4, 2 * prices, 0) + np.where(prices <= 0.2,
                                                                   2 * prices, 0)).mean()
    assert e.cost_usd == pytest.approx(cost_per_s / 3600, rel=0.02)


def test_steps_cover_the_skipped_steps_of_a_bid_plan():
    market = Market(0.1, 1.0, trace=_trace())
    plan = steps_for_target(Plan("x", "static", [Phase(2, bid=0.2)], True), market,
                            StepTime(0.1, 0.0), Startup(), updates=100)
    assert plan.feasible and plan.updates >= 100
    assert plan.steps == math.ceil(100 / 0.5)  # price <= 0.2 half of the time


def test_error_target_needs_more_steps_with_fewer_workers():
    market, t, s = Market(0.1, 0.4), StepTime(0.01, 0.0), Startup()
    model = ErrorModel(floor=0.1, a=20.0, b=0.4)
    small = steps_for_target(Plan("n=1", "static", [Phase(1)], True), market, t, s, error=0.6,
                             error_model=model)
    big = steps_for_target(Plan("n=4", "static", [Phase(4)], True), market, t, s, error=0.6,
                           error_model=model)
    assert small.steps == math.ceil(20 / (0.6 - 0.1 - 0.4))  # 200
    assert big.steps == math.ceil(20 / (0.6 - 0.1 - 0.1))  # 50
    impossible = steps_for_target(Plan("n=1", "static", [Phase(1)], True), market, t, s,
                                  error=0.45, error_model=model)
    assert not impossible.feasible  # below floor + b E[1/y]


def _plan(label, cost, time_s, runnable=True, feasible=True):
    p = Plan(label, "static", [Phase(1)], runnable, cost_usd=cost, time_s=time_s)
    p.feasible = feasible
    return p


def test_choose_picks_the_cheapest_plan_that_meets_the_deadline():
    plans = [_plan("slow", 1.0, 100), _plan("mid", 2.0, 50), _plan("fast", 3.0, 10),
             _plan("model", 0.5, 5, runnable=False), _plan("never", 0.1, 1, feasible=False)]
    assert choose(plans, None).label == "slow"
    assert choose(plans, 60).label == "mid"
    assert choose(plans, 10).label == "fast"
    assert choose(plans, 1) is None


def test_planner_recommends_more_workers_only_when_the_deadline_needs_them():
    """Per-step time falls with n up to a point (hand-made: 1 s of work shared), cost grows."""
    market = Market(spot_price=0.1, on_demand_price=0.4, q=0.0)
    plans = [steps_for_target(p, market, StepTime(1.0 / p.phases[0].workers, 0.0), Startup(),
                              updates=100)
             for p in candidate_plans([1, 2, 4], market, dynamic=False)]
    assert [p.label for p in plans] == ["n=1", "n=2", "n=4"]
    # each uses 100 worker-seconds of machine time: same cost; time 100, 50, 25 s
    assert [p.time_s for p in plans] == pytest.approx([100, 50, 25])
    plans[2].cost_usd *= 1.01  # a tie broken by hand: n=4 a little dearer
    plans[1].cost_usd *= 1.005
    assert choose(plans, None).label == "n=1"
    assert choose(plans, 60).label == "n=2"
    assert choose(plans, 30).label == "n=4"


def test_candidates_include_two_level_and_dynamic_plans():
    market = Market(0.1, 0.4, trace=_trace())
    labels = {p.label: p for p in candidate_plans([2], market, [0.2, 0.4])}
    assert labels["n=2 bids=0.4x1,0.2x1"].kind == "two-level"
    assert labels["n=2 bid=0.2->0.4"].runnable  # the same run resumed with a higher bid
    q_market = Market(0.1, 0.4, q=0.05)
    dyn = [p for p in candidate_plans([2, 4], q_market) if p.kind == "dynamic"]
    assert [p.label for p in dyn] == ["n=2->4"] and not dyn[0].runnable


def test_fits_recover_known_constants():
    live = [1, 2, 3, 4] * 5
    t = fit_step_time(live, [0.02 + 0.01 * y for y in live])
    assert (t.base, t.per_worker) == pytest.approx((0.02, 0.01))
    points = [(j, inv, 0.2 + 30 / j + 0.5 * inv) for j in (10, 20, 40, 80) for inv in (1, 0.25)]
    m = fit_error_model(points)
    assert (m.floor, m.a, m.b) == pytest.approx((0.2, 30, 0.5))
    flat = fit_error_model([(j, inv, 0.3 - 0.1 * inv) for j in (10, 20) for inv in (1, 0.5)])
    assert flat.b == 0.0  # a negative fit of b is dropped


@pytest.mark.parametrize("args, message", [
    (["workers=1,2"], "needs one target"),
    (["steps=10", "error=0.5"], "needs one target"),
    (["steps=ten"], "steps=ten: expected a whole number >= 1"),
    (["check_runs=x", "steps=10"], "check_runs=x: expected a whole number >= 1"),
    (["steps=10", "deadline=soon"], "deadline=soon: expected a number"),
    (["steps=10", "bids=0.1,x"], "bids=0.1,x: expected comma-separated numbers"),
    (["steps=10", "workers=0,2"], "workers=0,2: expected whole numbers >= 1"),
    (["steps=10", "step_s=0.1"], "step_s=0.1: expected 2 numbers"),
    (["steps=10", "dynamic=maybe"], "dynamic=maybe: not allowed; valid: true, false"),
    (["steps=10", "check_runs=0"], "check_runs=0: expected a whole number >= 1"),
])
def test_bad_plan_options_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan_args(args)


def test_plan_command_prints_a_table_and_a_train_command(tmp_path, capsys):
    code = main(["plan", "workers=1,2,4", "steps=200", "deadline=30", "step_s=0.02,0.01",
                 "startup_s=2,1,5", "cloud.preempt_prob=0.02", "model=mlp",
                 f"run.dir={tmp_path}", "run.name=p"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| * n=" in out and "recommended" in out
    command = [line for line in out.splitlines() if line.strip().startswith("squall train")]
    assert len(command) == 1 and "cloud=simulated" in command[0]
    assert "cloud.preempt_prob=0.02" in command[0] and "steps=" in command[0]
    assert (tmp_path / "p" / "plan.md").read_text().startswith("| plan")


def test_plan_command_rejects_bad_train_overrides_before_running(tmp_path, capsys):
    assert main(["plan", "steps=10", "workers=1,3", "strategy=krum",
                 "step_s=0.1,0", "startup_s=1,0,0"]) == 2
    assert "strategy=krum with workers=1" in capsys.readouterr().err
    assert main(["plan", "steps=10", "step_s=0.1,0", "startup_s=1,0,0", "deadline=0.5",
                 f"run.dir={tmp_path}"]) == 1  # nothing is that fast


def test_slow_plan_check_runs_plans_on_the_simulated_pool(tmp_path, capsys):
    """SLOW (four short cloud=simulated runs, about a minute on a 2-core machine): the
    recommended plan and one alternative run for real, twice each with other seeds, and are
    compared with the prediction."""
    code = main(["plan", "workers=1,2", "steps=20", "step_s=0.03,0.005", "startup_s=3,1,15",
                 "cloud.preempt_prob=0.01", "model=mlp", "data=digits", "--check",
                 "check_runs=2", "seed=3", f"run.dir={tmp_path}", "run.name=c"])
    out = capsys.readouterr().out
    assert code == 0
    report = (tmp_path / "c" / "check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "plan" not in line
            and "---" not in line]
    assert len(rows) == 2 and rows[0].startswith("| * n=")
    summaries = sorted((tmp_path / "c").glob("check-*/summary.json"))
    assert [p.parent.name[-6:] for p in summaries] == ["-seed3", "-seed4"] * 2
    for line in rows:
        label = line.split("|")[1].strip().removeprefix("* ")
        pair = [p for p in summaries if p.parent.name.startswith(f"check-{label}-seed")]
        costs = [json.loads(p.read_text())["cost_usd"] for p in pair]
        measured = float(line.split("|")[6].split()[0])  # the mean of the two runs
        assert measured == pytest.approx(sum(costs) / 2, abs=1e-5) and measured > 0
    assert "measured cost within 20% of predicted:" in out
    assert "recommended plan is the cheapest run that meets the target:" in out
    verdict = re.search(r"availability model: E\[y\] within 5% of the measured live workers: "
                        r"(yes|no) \(furthest: (\S+), ([+-]\d+)%\)", out)
    assert verdict, out
    holds, furthest, off = verdict.groups()
    assert abs(int(off)) <= 5 if holds == "yes" else abs(int(off)) >= 5  # (rounded to 1%)
    assert f"| {furthest} " in out or f"| * {furthest} " in out  # a plan of the table
