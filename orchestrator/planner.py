"""The planner's math (no Ray, no I/O): expected time and cost of synchronous SGD on volatile
workers, after Zhang, Wang, Joshi and Joe-Wong (INFOCOM 2020).

With n provisioned workers only y of them answer in a step. Preemptible model: each working
spot worker is reclaimed in a step with probability q, so y ~ Binomial(n, p). In the paper p
is 1 - q in every step; squall's simulated pool brings a reclaimed machine back after a delay,
so here p = p_j follows each slot's renewal process (working -> reclaimed -> waiting for a
machine, unbilled -> starting, billed -> working), computed step by step; with no repair it
is the paper's model exactly. Bid model: a worker lives while the spot price <= its bid, so with
one bid y is 0 or n, with two bid groups (n1 at b1 > b2, n2 at b2) P(y = n1) = F(b1) - F(b2),
P(y = n1 + n2) = F(b2), F the price CDF of the trace.

The paper's error bound after J updates, E[(1/J) sum ||grad F||^2] <= 2(F(w1) - F_inf)/(lr J)
+ lr L sigma^2 E[1/y], has the shape err(J) = a/J + b E[1/y]; squall fits
floor + a/J + b E[1/y] to the running mean of the training loss of calibration runs.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud.draws import spot_rng
from cloud.traces import PriceTrace
from orchestrator.config import ConfigError, load_config
from orchestrator.metrics import format_table, read_metrics


@dataclass(frozen=True)
class StepTime:
    """Seconds per step with y live workers: base + per_worker * y."""

    base: float
    per_worker: float

    def __call__(self, y: float) -> float:
        return self.base + self.per_worker * y


@dataclass(frozen=True)
class Startup:
    """Per run: seconds billed before and after the steps (workers starting, the final
    checkpoint) = billed_base + billed_per_worker * n, and seconds not billed (Ray start,
    data loading, shutdown)."""

    billed_base: float = 0.0
    billed_per_worker: float = 0.0
    unbilled: float = 0.0

    def billed(self, n: int) -> float:
        return self.billed_base + self.billed_per_worker * n


@dataclass(frozen=True)
class ErrorModel:
    """Mean training loss over J updates with E[1/y]: floor + a / J + b * E[1/y]."""

    floor: float
    a: float
    b: float

    def error(self, updates: float, inv_y: float) -> float:
        return self.floor + self.a / max(updates, 1e-12) + self.b * inv_y


@dataclass(frozen=True)
class Market:
    """Prices ($/h) and the preemption model: q per worker per step, or a trace with bids."""

    spot_price: float
    on_demand_price: float
    q: float = 0.0
    wait_s: float = 0.0  # after a reclaim: seconds until a replacement machine exists
    start_s: float = 0.0  # then seconds until its worker works (billed)
    trace: PriceTrace | None = None


@dataclass(frozen=True)
class Phase:
    """`fraction` of the steps run with `workers` workers; with a trace, `low` of them bid
    `low_bid` and the rest bid `bid` (two-level bids)."""

    workers: int
    fraction: float = 1.0
    bid: float | None = None
    low: int = 0
    low_bid: float | None = None


@dataclass
class Plan:
    label: str
    kind: str  # "static", "two-level" or "dynamic"
    phases: list[Phase]
    runnable: bool  # expressible as `squall train` runs (else the model's answer only)
    steps: int = 0  # training steps to run (skipped steps included)
    updates: float = 0.0  # expected steps with at least one worker
    e_y: float = 0.0  # mean over steps of E[y]
    e_inv_y: float = 0.0  # mean over steps of E[1/y | y >= 1]
    time_s: float = 0.0
    cost_usd: float = 0.0
    on_demand_cost_usd: float = 0.0
    error: float | None = None
    feasible: bool = True
    phase_steps: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- binomial sums
def binomial_pmf(n: int, p: np.ndarray | float) -> np.ndarray:
    """P(y = k) for k = 0..n, one row per p (shape [len(p), n + 1])."""
    p = np.atleast_1d(np.asarray(p, dtype=float))[:, None]
    k = np.arange(n + 1)[None, :]
    comb = np.array([math.comb(n, i) for i in range(n + 1)], dtype=float)[None, :]
    return comb * p ** k * (1 - p) ** (n - k)


def binomial_moments(n: int, p: float) -> tuple[float, float, float]:
    """For y ~ Binomial(n, p): E[y], E[1/y | y >= 1] and P(y >= 1), by direct sums."""
    pmf = binomial_pmf(n, p)[0]
    any_ = 1 - pmf[0]
    inv = float((pmf[1:] / np.arange(1, n + 1)).sum() / any_) if any_ > 0 else math.inf
    return float(n * p), inv, float(any_)


# --------------------------------------------------------------------------- one slot
def slot_availability(q: float, steps: int, wait: int, start: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """One worker slot of the simulated pool over `steps` steps: P(it answers in step j) and
    P(its machine is billed in step j). It works from step 1; a working worker is reclaimed
    in a step with probability q (and does not answer in it); the next `wait` steps it has no
    machine, the `start` steps after that its machine starts (billed), then it works again."""
    down = wait + start
    working = np.zeros(steps)
    reclaimed = np.zeros(steps)
    w = 1.0
    for j in range(steps):
        working[j] = w
        reclaimed[j] = q * w
        back = reclaimed[j - down] if j >= down else 0.0  # down = 0: back at once
        w = w * (1 - q) + back
    billed = working.copy()
    for j in range(steps):  # starting machines: reclaimed in k with j - down <= k < j - wait
        lo, hi = max(j - down, 0), j - wait
        if hi > lo:
            billed[j] += reclaimed[lo:hi].sum()
    return working * (1 - q), billed


def replay_live_workers(seed: int, q: float, d: int, n: int, steps: int) -> list[int]:
    """The model of slot_availability(q, steps, wait=d, start=0) played on the simulated
    pool's own draws (cloud.draws.spot_rng; cloud.preempt_prob=q, cloud.replace_delay_steps=d,
    workers=n): in each step every working worker, in the order of its machine's id, is
    reclaimed with probability q and does not answer; its replacement, a new machine, works
    from step reclaim + d + 1. Returns the workers that answer in steps 1..steps: what such a
    run must log, step for step."""
    working, waiting, next_id, answered = list(range(n)), [], n, []
    for step in range(1, steps + 1):
        working = sorted(working + [i for due, i in waiting if due <= step])
        waiting = [(due, i) for due, i in waiting if due > step]
        rng = spot_rng(seed, step)
        gone = [i for i in working if rng.random() < q]
        for _ in gone:
            waiting.append((step + d + 1, next_id))
            next_id += 1
        working = [i for i in working if i not in gone]
        answered.append(len(working))
    return answered


# --------------------------------------------------------------------------- one phase
@dataclass
class PhaseEstimate:
    updates: float  # expected steps with y >= 1
    inv_y_sum: float  # sum over steps of E[1/y | y >= 1]
    y_sum: float
    time_s: float
    cost_usd: float
    on_demand_cost_usd: float


def estimate_phase(phase: Phase, steps: int, market: Market, step_time: StepTime,
                   startup: Startup) -> PhaseEstimate:
    """Expected figures of one `squall train` run of `steps` steps."""
    n = phase.workers
    if market.trace is None:
        t_full = step_time(n)
        wait = math.ceil(market.wait_s / t_full)
        start = math.ceil(market.start_s / t_full)
        answer, billed = slot_availability(market.q, steps, wait, start)
        pmf = binomial_pmf(n, answer)  # [steps, n + 1]
        price = market.spot_price
        billed_machines = n * billed
    else:
        pmf, billed_machines, price = _bid_states(phase, market)
        pmf = np.repeat(pmf[None, :], steps, axis=0)
        billed_machines = np.full(steps, billed_machines)
    ys = np.arange(n + 1)
    # a step with nobody alive waits about one full step (the loop sleeps its running mean)
    t_y = np.where(ys == 0, step_time(n), step_time(ys))
    t = pmf @ t_y
    p_any = 1 - pmf[:, 0]
    inv = np.divide(pmf[:, 1:] @ (1 / ys[1:]), p_any, out=np.full(steps, 1.0 / n),
                    where=p_any > 0)
    billed_s = startup.billed(n)
    train_s = float(t.sum())
    cost = (n * billed_s + float((t * billed_machines).sum())) * price / 3600
    on_demand = n * (billed_s + train_s) * market.on_demand_price / 3600
    return PhaseEstimate(float(p_any.sum()), float(inv.sum()), float((pmf @ ys).sum()),
                         startup.unbilled + billed_s + train_s, cost, on_demand)


def _bid_states(phase: Phase, market: Market) -> tuple[np.ndarray, float, float]:
    """Bid model: P(y = k), expected billed machines per step, and the price they pay on
    average per billed machine ($/h)."""
    trace = market.trace
    n, low = phase.workers, phase.low
    high_bid = phase.bid if phase.bid is not None else market.on_demand_price
    low_bid = phase.low_bid if low else high_bid
    f_high, paid_high = price_below(trace, high_bid)
    f_low, paid_low = price_below(trace, low_bid)
    pmf = np.zeros(n + 1)
    pmf[n] = f_low
    pmf[n - low] += f_high - f_low
    pmf[0] += 1 - f_high
    billed = (n - low) * f_high + low * f_low
    paid = ((n - low) * f_high * paid_high + low * f_low * paid_low) / billed if billed else 0.0
    return pmf, billed, paid


def price_below(trace: PriceTrace, bid: float, samples: int = 10_000) -> tuple[float, float]:
    """F(bid) = fraction of trace time with price <= bid, and the mean price over that time."""
    if trace.duration <= 0:
        ok = trace.prices[0] <= bid
        return float(ok), trace.prices[0] if ok else 0.0
    ts = trace.duration * (np.arange(samples) + 0.5) / samples
    idx = np.searchsorted(np.asarray(trace.times), ts, side="right") - 1
    prices = np.asarray(trace.prices)[np.maximum(idx, 0)]
    below = prices <= bid
    return float(below.mean()), float(prices[below].mean()) if below.any() else 0.0


# --------------------------------------------------------------------------- whole plans
def evaluate(plan: Plan, steps: int, market: Market, step_time: StepTime, startup: Startup,
             error_model: ErrorModel | None = None) -> Plan:
    """Fill in the plan's expected figures for `steps` training steps in all."""
    plan.steps, plan.phase_steps = steps, []
    totals = np.zeros(6)
    done = 0
    for i, phase in enumerate(plan.phases):
        k = steps - done if i == len(plan.phases) - 1 else round(steps * phase.fraction)
        plan.phase_steps.append(k)
        done += k
        e = estimate_phase(phase, k, market, step_time, startup)
        totals += [e.updates, e.inv_y_sum, e.y_sum, e.time_s, e.cost_usd, e.on_demand_cost_usd]
    (plan.updates, inv_sum, y_sum, plan.time_s, plan.cost_usd,
     plan.on_demand_cost_usd) = map(float, totals)
    plan.e_inv_y, plan.e_y = inv_sum / steps, y_sum / steps
    if error_model is not None:
        plan.error = error_model.error(plan.updates, plan.e_inv_y)
    return plan


def steps_for_target(plan: Plan, market: Market, step_time: StepTime, startup: Startup, *,
                     updates: int | None = None, error: float | None = None,
                     error_model: ErrorModel | None = None, max_steps: int = 100_000) -> Plan:
    """The fewest training steps that give `updates` expected updates (steps with y >= 1), or
    whose modelled error is <= `error`. Infeasible plans come back with feasible=False."""

    def ok(j: int) -> bool:
        evaluate(plan, j, market, step_time, startup, error_model)
        if updates is not None:
            return plan.updates >= updates - 1e-9
        return plan.error is not None and plan.error <= error

    lo, hi = 0, max(updates or 1, len(plan.phases))
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_steps:
            plan.feasible = False
            return plan
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return evaluate(plan, hi, market, step_time, startup, error_model)


def candidate_plans(workers: list[int], market: Market, bids: list[float] | None = None,
                    dynamic: bool = True) -> list[Plan]:
    """Static plans for every n (and bid); two-level bids and dynamic plans (more workers, or a
    higher bid, for the second half of the steps)."""
    plans: list[Plan] = []
    ns = sorted(set(workers))
    if market.trace is None:
        for n in ns:
            plans.append(Plan(f"n={n}", "static", [Phase(n)], True))
        if dynamic:
            for n1, n2 in zip(ns, ns[1:]):
                plans.append(Plan(f"n={n1}->{n2}", "dynamic",
                                  [Phase(n1, 0.5), Phase(n2, 0.5)], False))
        return plans
    bs = sorted(set(bids or [market.on_demand_price]))
    for n in ns:
        for b in bs:
            plans.append(Plan(f"n={n} bid={b:g}", "static", [Phase(n, bid=b)], True))
        for hi_b in bs:  # two-level: half the workers bid lower
            for lo_b in (b for b in bs if b < hi_b):
                if n >= 2:
                    plans.append(Plan(f"n={n} bids={hi_b:g}x{n - n // 2},{lo_b:g}x{n // 2}",
                                      "two-level",
                                      [Phase(n, bid=hi_b, low=n // 2, low_bid=lo_b)], False))
        if dynamic:
            for b1, b2 in zip(bs, bs[1:]):  # same workers, higher bid later: resumable
                plans.append(Plan(f"n={n} bid={b1:g}->{b2:g}", "dynamic",
                                  [Phase(n, 0.5, bid=b1), Phase(n, 0.5, bid=b2)], True))
    return plans


def choose(plans: list[Plan], deadline_s: float | None) -> Plan | None:
    """The cheapest runnable plan that reaches the target within the deadline."""
    ok = [p for p in plans if p.runnable and p.feasible and
          (deadline_s is None or p.time_s <= deadline_s)]
    return min(ok, key=lambda p: p.cost_usd) if ok else None


# --------------------------------------------------------------------------- fitting
def fit_step_time(live: list[float], seconds: list[float]) -> StepTime:
    """Least squares seconds = base + per_worker * live (per_worker >= 0)."""
    y, s = np.asarray(live, dtype=float), np.asarray(seconds, dtype=float)
    if np.ptp(y) == 0:
        return StepTime(float(s.mean()) / 2, float(s.mean()) / 2 / max(y[0], 1))
    per, base = np.polyfit(y, s, 1)
    if per < 0:
        return StepTime(float(s.mean()), 0.0)
    return StepTime(float(base), float(per))


def fit_error_model(points: list[tuple[float, float, float]]) -> ErrorModel:
    """Least squares loss = floor + a / J + b * inv_y over (J, inv_y, mean loss) points,
    with a, b >= 0 (a term that fits negative is dropped)."""
    j, inv, loss = (np.asarray(c, dtype=float) for c in zip(*points))
    columns = {"a": 1 / j, "b": inv}
    while True:
        x = np.column_stack([np.ones_like(j), *columns.values()])
        coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
        fitted = dict(zip(columns, coef[1:]))
        negative = [k for k, v in fitted.items() if v < 0]
        if not negative:
            return ErrorModel(float(coef[0]), float(fitted.get("a", 0.0)),
                              float(fitted.get("b", 0.0)))
        del columns[negative[0]]


# =========================================================================== the command
# Everything below runs jobs and prints; the math above never does.
PLAN_USAGE = """usage: squall plan [workers=1,2,4,8] [steps=N | error=LOSS] [deadline=SECONDS]
           [bids=B1,B2,...] [step_s=BASE,PER_WORKER] [startup_s=BILLED,PER_WORKER,UNBILLED]
           [rejoin_s=S] [calibrate_steps=60] [dynamic=true] [--check] [check_runs=3]
           [train overrides]
(docs/planning.md explains each option and the model)"""
PLAN_KEYS = ("workers", "steps", "error", "deadline", "bids", "step_s", "startup_s", "rejoin_s",
             "calibrate_steps", "dynamic", "check_runs")



@dataclass
class PlanRequest:
    """squall plan's own options; everything else is a `squall train` override."""

    workers: list[int]
    steps: int | None = None
    error: float | None = None
    deadline: float | None = None
    bids: list[float] | None = None
    step_s: StepTime | None = None
    startup_s: Startup | None = None
    rejoin_s: float | None = None
    calibrate_steps: int = 60
    check_runs: int = 3  # --check runs each plan this often (seeds seed, seed+1, ...)
    dynamic: bool = True
    check: bool = False
    overrides: list[str] = field(default_factory=list)


def _numbers(key: str, text: str, count: int | None = None) -> list[float]:
    """count comma-separated numbers >= 0 (any number of them when count is None)."""
    expected = {None: "comma-separated numbers", 1: "a number"}.get(count, f"{count} numbers")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{key}={text}: expected {expected}") from None
    if count is not None and len(values) != count:
        raise ConfigError(f"{key}={text}: expected {expected}")
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"{key}={text}: must be >= 0")
    return values


def parse_plan_args(args: list[str]) -> PlanRequest:
    """Split squall plan's options from the train overrides and check them (ConfigError)."""
    req = PlanRequest(workers=[1, 2, 4, 8])
    for text in args:
        if text == "--check":
            req.check = True
            continue
        key, sep, value = text.partition("=")
        if not sep or key not in PLAN_KEYS:
            req.overrides.append(text)
            continue
        if key == "workers":
            values = _numbers(key, value)
            if any(v < 1 or v != int(v) for v in values):
                raise ConfigError(f"workers={value}: expected whole numbers >= 1")
            req.workers = [int(v) for v in values]
        elif key in ("steps", "calibrate_steps", "check_runs"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key}={value}: expected a whole number >= 1")
            setattr(req, key, int(value))
        elif key in ("error", "deadline", "rejoin_s"):
            setattr(req, key, _numbers(key, value, 1)[0])
        elif key == "bids":
            req.bids = _numbers(key, value)
        elif key == "step_s":
            req.step_s = StepTime(*_numbers(key, value, 2))
        elif key == "startup_s":
            req.startup_s = Startup(*_numbers(key, value, 3))
        elif key == "dynamic":
            if value not in ("true", "false"):
                raise ConfigError(f"dynamic={value}: not allowed; valid: true, false")
            req.dynamic = value == "true"
    if (req.steps is None) == (req.error is None):
        raise ConfigError("squall plan needs one target: steps=N (updates) or error=LOSS")
    if req.error is not None and req.step_s is not None and req.startup_s is not None:
        raise ConfigError("error=LOSS needs calibration runs (to fit the error model): "
                          "leave out step_s and startup_s")
    return req


def run_plan(args: list[str]) -> int:
    """squall plan: calibrate if needed, print the table and the recommendation; with --check
    run the recommendation and alternatives on cloud=simulated."""
    req = parse_plan_args(args)
    base = ["cloud=simulated", *(o for o in req.overrides if not o.startswith("run.name="))]
    cfg = load_config([*base, *req.overrides])  # every candidate is checked before anything runs
    if cfg.cloud.name != "simulated":  # the market model reads the simulated pool's options
        raise ConfigError(f"squall plan models a spot pool: cloud=simulated (got "
                          f"cloud={cfg.cloud.name})")
    for n in req.workers:
        load_config([*base, f"workers={n}", "steps=1"])
    if cfg.cloud.trace and not req.bids:
        req.bids = [cfg.cloud.bid or cfg.cloud.on_demand_price]
    if req.bids and not cfg.cloud.trace:
        raise ConfigError("bids=...: needs a price trace, cloud.trace=FILE")
    trace = None
    if cfg.cloud.trace:
        from cloud.traces import load_trace

        try:
            trace = load_trace(cfg.cloud.trace, cfg.cloud.instance_type)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    name = cfg.run.name or time.strftime("plan-%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.dir).expanduser() / name
    error_model = None
    step_time, startup = req.step_s, req.startup_s
    if step_time is None or startup is None:
        fitted = calibrate(base, sorted({min(req.workers), max(req.workers)}),
                           req.calibrate_steps, out_dir)
        step_time, startup = step_time or fitted[0], startup or fitted[1]
        error_model = fitted[2]
        print(f"calibration: step_s = {step_time.base:.4f} + {step_time.per_worker:.4f} * y; "
              f"startup billed {startup.billed_base:.2f} + {startup.billed_per_worker:.2f} * n s,"
              f" unbilled {startup.unbilled:.2f} s; loss ~ {error_model.floor:.3f} + "
              f"{error_model.a:.3f}/J + {error_model.b:.3f}*E[1/y]")
    market = Market(cfg.cloud.spot_price, cfg.cloud.on_demand_price, cfg.cloud.preempt_prob,
                    cfg.cloud.replace_delay_s,
                    startup.billed(1) if req.rejoin_s is None else req.rejoin_s, trace)
    plans = [steps_for_target(p, market, step_time, startup, updates=req.steps, error=req.error,
                              error_model=error_model)
             for p in candidate_plans(req.workers, market, req.bids, req.dynamic)]
    best = choose(plans, req.deadline)
    table = plan_table(plans, best, req.deadline)
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.md").write_text(table + "\n")
    if best is None:
        print("squall: no runnable plan reaches the target within the deadline", file=sys.stderr)
        return 1
    print("recommended (cheapest within the deadline):")
    for command in train_commands(best, base, f"{name}/{_slug(best)}"):
        print("  squall train " + " ".join(command))
    if not req.check:
        return 0
    report = check(best, plans, base, out_dir, req.deadline, req.check_runs)
    print(report)
    (out_dir / "check.md").write_text(report + "\n")
    return 0


def calibrate(base: list[str], ns: list[int], steps: int,
              out_dir: Path) -> tuple[StepTime, Startup, ErrorModel]:
    """Short runs without preemption at the smallest and largest n: fit step time, start-up
    and the error model from their metrics."""
    from orchestrator.run import train

    live, dt, billed, unbilled, points = [], [], {}, [], []
    for n in ns:
        cfg = load_config([*base, f"workers={n}", f"steps={steps}", "cloud.preempt_prob=0",
                           "cloud.trace=", "log.progress=false",
                           f"run.dir={out_dir}", f"run.name=calibrate-n{n}"])
        if cfg.cloud.on_demand_price <= 0:
            raise ConfigError("calibration needs cloud.on_demand_price > 0 (it times the billed "
                              "seconds)")
        print(f"calibration run: workers={n} steps={steps}")
        summary = train(cfg)
        rows = read_metrics(summary["run_dir"])
        step_dt = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:])]
        skip = min(4, len(step_dt) // 2)  # the first steps warm up
        live += [r["live_workers"] for r in rows[1 + skip:]]
        dt += step_dt[skip:]
        billed_s = summary["on_demand_cost_usd"] / (n * cfg.cloud.on_demand_price / 3600)
        billed[n] = billed_s - len(rows) * float(np.mean(step_dt[skip:]))
        unbilled.append(summary["wall_s"] - billed_s)
        losses = np.cumsum([r["loss"] for r in rows]) / np.arange(1, len(rows) + 1)
        points += [(j, 1 / n, losses[j - 1]) for j in range(5, len(rows) + 1, 5)]
    if len(ns) > 1:
        per = max(0.0, (billed[ns[-1]] - billed[ns[0]]) / (ns[-1] - ns[0]))
        startup = Startup(max(0.0, billed[ns[0]] - per * ns[0]), per, float(np.mean(unbilled)))
    else:
        startup = Startup(max(0.0, billed[ns[0]]), 0.0, float(np.mean(unbilled)))
    return fit_step_time(live, dt), startup, fit_error_model(points)


def _slug(plan: Plan) -> str:
    return re.sub(r"[^A-Za-z0-9=.,-]+", "_", plan.label)


def train_commands(plan: Plan, base: list[str], run_name: str) -> list[list[str]]:
    """The `squall train` overrides of a runnable plan: one run, or (a higher bid later) the
    same run resumed with more steps."""
    commands, done = [], 0
    for phase, k in zip(plan.phases, plan.phase_steps):
        done += k
        command = [*base, f"workers={phase.workers}", f"steps={done}", f"run.name={run_name}"]
        if phase.bid is not None:
            command.append(f"cloud.bid={phase.bid:g}")
        commands.append(command)
    return commands


def plan_table(plans: list[Plan], best: Plan | None, deadline: float | None) -> str:
    rows = []
    for p in sorted(plans, key=lambda p: (not p.feasible, p.cost_usd)):
        meets = p.feasible and (deadline is None or p.time_s <= deadline)
        rows.append([("* " if p is best else "") + p.label, p.kind, str(p.steps),
                     f"{p.e_y:.2f}", f"{p.e_inv_y:.3f}", f"{p.time_s:.1f}",
                     f"{p.cost_usd:.5f}", f"{p.on_demand_cost_usd:.5f}",
                     "" if p.error is None else f"{p.error:.3f}",
                     "yes" if meets else "no", "yes" if p.runnable else "model only"])
    return format_table(["plan", "kind", "steps", "E[y]", "E[1/y]", "time s", "cost $",
                         "on-demand $", "error", "meets", "runnable"], rows)


AVAILABILITY_TOLERANCE = 0.05  # |live mean / E[y] - 1| the model is held to


def check(best: Plan, plans: list[Plan], base: list[str], out_dir: Path,
          deadline: float | None, runs: int = 3) -> str:
    """Run the recommendation and up to two alternatives on cloud=simulated, each `runs` times
    (seeds seed, seed+1, ...: other preemption draws); compare the means with the model."""
    from orchestrator.run import train

    others = sorted((p for p in plans if p.runnable and p.feasible and p is not best),
                    key=lambda p: p.cost_usd)
    cheaper = [p for p in others if p.cost_usd < best.cost_usd][:1]  # missed the deadline
    dearer = [p for p in others if p.cost_usd >= best.cost_usd][:2 - len(cheaper)]
    seed0 = load_config(base).seed
    rows, measured, offs, live_offs = [], {}, [], {}
    for plan in [best, *cheaper, *dearer]:
        summaries = []
        for r in range(runs):
            name = f"check-{_slug(plan)}-seed{seed0 + r}"
            for command in train_commands(plan, base, name):
                cfg = load_config([*command, f"seed={seed0 + r}", f"run.dir={out_dir}",
                                   "log.progress=false"])
                print(f"check run: {plan.label}, seed {cfg.seed} ({cfg.steps} steps)")
                summary = train(cfg)
                if summary["interrupted"] or summary["error"]:
                    break
            summaries.append(summary)
            if summary["interrupted"]:
                break
        met = sum(s["steps_done"] == plan.steps and not s["error"] and
                  (deadline is None or s["wall_s"] <= deadline) for s in summaries)
        cost, wall, live, preempted = (float(np.mean([s[key] for s in summaries])) for key in
                                       ("cost_usd", "wall_s", "live_workers_mean", "preemptions"))
        updates = np.mean([s["steps_done"] - s.get("skipped_steps", 0) for s in summaries])
        measured[plan.label] = (cost, met == len(summaries))
        off = cost / plan.cost_usd - 1 if plan.cost_usd else math.inf
        offs.append(off)
        live_offs[plan.label] = live / plan.e_y - 1 if plan.e_y else math.inf
        spread = (f" ({min(s['cost_usd'] for s in summaries):.5f}-"
                  f"{max(s['cost_usd'] for s in summaries):.5f})" if len(summaries) > 1 else "")
        rows.append([("* " if plan is best else "") + plan.label, str(plan.steps),
                     f"{plan.updates:.0f}", f"{updates:.0f}", f"{plan.cost_usd:.5f}",
                     f"{cost:.5f}{spread}", f"{off:+.0%}", f"{plan.time_s:.1f}", f"{wall:.1f}",
                     f"{plan.e_y:.2f}", f"{live:.2f}", f"{live_offs[plan.label]:+.0%}",
                     f"{preempted:.1f}", f"{met}/{len(summaries)}"])
        if summaries[-1]["interrupted"]:
            break
    table = format_table(["plan", "steps", "E[updates]", "updates", "predicted $",
                          "measured $ (range)", "cost off", "predicted s", "measured s",
                          "E[y]", "live mean", "live off", "preemptions", "met"], rows)
    within = all(abs(off) <= 0.2 for off in offs)
    furthest = max(live_offs, key=lambda label: abs(live_offs[label]))
    model_holds = abs(live_offs[furthest]) <= AVAILABILITY_TOLERANCE
    best_cost, best_meets = measured[best.label]
    cheapest = best_meets and all(cost >= best_cost for cost, ok in measured.values() if ok)
    return (f"{table}\n(measured: the mean of {runs} runs per plan, seeds {seed0}-"
            f"{seed0 + runs - 1})\n"
            f"measured cost within 20% of predicted: {'yes' if within else 'no'}\n"
            f"recommended plan is the cheapest run that meets the target: "
            f"{'yes' if cheapest else 'no'}\n"
            f"availability model: E[y] within {AVAILABILITY_TOLERANCE:.0%} of the measured live "
            f"workers: {'yes' if model_holds else 'no'} (furthest: {furthest}, "
            f"{live_offs[furthest]:+.0%})")
