"""Time squall's aggregation rules against ByzFL on identical float32 inputs.

    .venv/bin/python -m benchmarks.aggregators            # full run, writes aggregators.md
    .venv/bin/python -m benchmarks.aggregators --quick    # tiny smoke run, prints only

ByzFL (`pip install byzfl`, benchmark-only) accepts torch tensors and NumPy arrays and
switches backend on the type; both paths are timed, on the same values. Both libraries get
the same thread budget: torch.set_num_threads for torch and threadpoolctl for the BLAS /
OpenMP pools NumPy and SciPy use.

The whole measurement (every table) runs `--rounds` times, one round after the other. The
tables show the median over rounds, the speed-up and ratio cells also every round's value,
and the verdicts on the targets (TRIMMED_MIN, BULYAN_MAX, DISTANCE_MIN below) are computed
from those numbers. Only the part of benchmarks/aggregators.md between `<!-- generated -->`
and `<!-- end generated -->` is rewritten; the hand-written reading notes after it are kept.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.md_parts import write_generated
from strategies import kernels
from strategies import preaggregation as pre
from strategies.rules.bulyan import bulyan
from strategies.rules.centered_clip import centered_clip
from strategies.rules.geomed import _geomed_gram, _weiszfeld, geometric_median
from strategies.rules.krum import krum
from strategies.rules.mean import mean
from strategies.rules.median import median
from strategies.rules.multi_krum import multi_krum
from strategies.rules.sign_vote import sign_vote
from strategies.rules.trimmed_mean import trimmed_mean

try:
    from byzfl.aggregators import aggregators as bz
    from byzfl.aggregators import preaggregators as bzpre
except ImportError:  # pragma: no cover - benchmark-only dependency
    sys.exit("benchmarks/aggregators.py needs ByzFL: .venv/bin/pip install byzfl")

NU, TOL = 1e-6, 1e-6  # geometric median smoothing and tolerance
TAU, ITERS = 1.0, 3  # centered clipping
BUCKET = 2
RULE_FUNCTIONS = {"median": median, "trimmed_mean": trimmed_mean, "bulyan": bulyan, "krum": krum,
                  "geometric_median": geometric_median}
OFFSET = 10.0  # common component added to every row for the "offset rows" case
TRIMMED_MIN = 3.0  # trimmed_mean >= 3x ByzFL's NumPy path at every measured n, d
BULYAN_MAX = 2.0  # Bulyan's time <= 2x Multi-Krum's (squall's own) at every measured n, d
DISTANCE_MIN, DISTANCE_D = 3.0, 10**5  # these rules >= 3x both ByzFL paths at d = 1e5
DISTANCE_RULES = ("krum", "multi_krum", "krum, offset rows", "geomed")
TITLE = "Aggregation rules: squall vs ByzFL"
NOTES_STUB = ("## Reading notes\n\n(Hand-written and dated; `python -m benchmarks.aggregators` "
              "rewrites only the part between the markers above.)\n")


@dataclass
class Case:
    rule: str
    squall: Callable[[torch.Tensor], torch.Tensor]
    byzfl: Callable[[], Callable] | None  # builds a fresh ByzFL aggregator
    note: str = ""
    offset: float = 0.0  # run on G + offset instead of G


def cases(n: int, f: int, G: torch.Tensor) -> list[Case]:
    # ByzFL's GeometricMedian runs a fixed T iterations (no tolerance) from z = 0: give it
    # the number of iterations squall needs to reach TOL on this input, at the same nu.
    K, _ = _geomed_gram(G)
    _, iters = _weiszfeld(K, NU, TOL, 1000, torch.finfo(G.dtype).tiny)
    gen = torch.Generator().manual_seed(0)
    return [
        Case("mean", mean, bz.Average),
        Case("median", median, bz.Median),
        Case("trimmed_mean", lambda G: trimmed_mean(G, f), lambda: bz.TrMean(f)),
        Case("krum", lambda G: krum(G, f), lambda: bz.Krum(f), "ByzFL: n-f-1 neighbours"),
        Case(
            "multi_krum",
            lambda G: multi_krum(G, f),
            lambda: bz.MultiKrum(f),
            "ByzFL: n-f-1 neighbours",
        ),
        Case(
            "krum, offset rows",
            lambda G: krum(G, f),
            lambda: bz.Krum(f),
            f"rows + {OFFSET:g}: squall's Gram matrix is centred on a row",
            offset=OFFSET,
        ),
        Case("bulyan", lambda G: bulyan(G, f), None, "not in ByzFL"),
        Case(
            "geomed",
            lambda G: geometric_median(G, nu=NU, tol=TOL),
            lambda: bz.GeometricMedian(nu=NU, T=iters),
            f"{iters} Weiszfeld iterations each (tol {TOL:g}, nu {NU:g})",
        ),
        Case(
            "centered_clip",
            lambda G: centered_clip(G, tau=TAU, iters=ITERS),
            lambda: bz.CenteredClipping(L=ITERS, tau=TAU),
            f"tau {TAU:g}, {ITERS} iterations",
        ),
        Case("sign_vote", sign_vote, None, "not in ByzFL"),
        Case("nnm (pre)", lambda G: pre.nnm(G, f), lambda: bzpre.NNM(f)),
        Case(
            "bucketing (pre)",
            lambda G: pre.bucketing(G, BUCKET, gen),
            lambda: bzpre.Bucketing(BUCKET),
            f"s={BUCKET}; the random permutations differ",
        ),
    ]


PAIRED = True  # main(--cross) turns it off


def timed(fns: list[Callable[[], object]], reps: int) -> list[tuple[float, object]]:
    """(median ms over reps after one warm-up, warm-up result) for each fn; NaN ms for one
    that raises. Timed round-robin (a, b, c, a, b, c, ...) so that all see the same load;
    with PAIRED each timed call comes right after an untimed call of the same fn (a a b b
    c c a a ...), so that none is timed in the state another implementation left."""
    results: list[object] = []
    for fn in fns:
        try:
            results.append(fn())
        except Exception as err:  # e.g. torch.quantile's input size limit inside ByzFL
            results.append(err)
    kernels.wait()  # squall's fused kernels for these shapes are compiled: time those
    ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    times: dict[int, list[float]] = {i: [] for i in ok}
    for _ in range(reps):
        for i in ok:
            if PAIRED:
                fns[i]()
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [
        (statistics.median(times[i]) * 1e3 if i in times else math.nan, results[i])
        for i in range(len(fns))
    ]


def rel_diff(ours: torch.Tensor, theirs: object) -> float | None:
    """max |ours - theirs| / max |theirs|; None where there is nothing to compare."""
    if theirs is None or isinstance(theirs, Exception):
        return None
    theirs = torch.as_tensor(np.asarray(theirs) if not torch.is_tensor(theirs) else theirs)
    if theirs.shape != ours.shape:
        return None
    scale = theirs.abs().max().clamp_min(1e-30)
    return ((ours - theirs.to(ours.dtype)).abs().max() / scale).item()


# ----------------------------------------------------------------------- one round's numbers


@dataclass
class CaseTime:
    """One row of the main table in one round; NaN ms where ByzFL lacks the rule or raised."""

    rule: str
    n: int
    d: int
    squall_ms: float
    torch_ms: float
    numpy_ms: float
    diff: float | None
    note: str
    in_byzfl: bool


@dataclass
class BulyanTime:
    n: int
    d: int
    f: int
    bulyan_ms: float
    multi_krum_ms: float


@dataclass
class FusedTime:
    rule: str
    n: int
    d: int
    eager_ms: float
    fused_ms: float
    compile_s: float
    diff: float


@dataclass
class Round:
    """Everything one pass over all sizes measures, in the order it was measured."""

    cases: list[CaseTime] = field(default_factory=list)
    bulyan: list[BulyanTime] = field(default_factory=list)
    fused: list[FusedTime] = field(default_factory=list)


def speedup(slow_ms: float, fast_ms: float) -> float:
    """slow / fast; NaN when either is missing."""
    return math.nan if math.isnan(slow_ms) or math.isnan(fast_ms) else slow_ms / fast_ms


def fused_vs_eager(n: int, d: int, f: int, G: torch.Tensor, reps: int) -> list[FusedTime]:
    """The compiled-kernel table: the order-statistic rules and two Gram-matrix rules compiled
    and eager (the eager one runs with SQUALL_COMPILE=0), and the seconds the first compile
    took (near 0 once this process has compiled that shape, as in every round after the
    first)."""
    out = []
    for rule in ("median", "trimmed_mean", "bulyan", "krum", "geometric_median"):
        fn = partial(RULE_FUNCTIONS[rule], G, f)
        start = time.perf_counter()
        fn()  # queues the compile
        kernels.wait()
        compile_s = time.perf_counter() - start

        def eager(fn: Callable = fn) -> torch.Tensor:
            os.environ["SQUALL_COMPILE"] = "0"
            try:
                return fn()
            finally:
                os.environ["SQUALL_COMPILE"] = "1"

        (fused_ms, fused), (eager_ms, eager_out) = timed([fn, eager], reps)
        diff = ((fused - eager_out).abs().max() / eager_out.abs().max()).item()
        out.append(FusedTime(rule, n, d, eager_ms, fused_ms, compile_s, diff))
        print(f"  fused {rule} n={n} d={d:.0e}: eager {fmt(eager_ms)} ms, fused "
              f"{fmt(fused_ms)} ms, compile {compile_s:.1f} s", flush=True)
    return out


def measure_case(case: Case, n: int, d: int, G: torch.Tensor, reps: int) -> CaseTime:
    """squall and (where it has the rule) ByzFL's torch and NumPy paths on one input."""
    X = G + case.offset if case.offset else G
    A = X.numpy()  # same memory, ByzFL's NumPy path
    fns = [partial(case.squall, X)]
    if case.byzfl is not None:  # a fresh ByzFL aggregator per call, on each input type
        fns += [lambda c=case, X=X: c.byzfl()(X), lambda c=case, A=A: c.byzfl()(A)]
    (ours_ms, ours), *theirs = timed(fns, reps)
    (t_ms, t_out), (n_ms, _) = theirs or [(math.nan, None)] * 2
    compare = case.byzfl is not None and "bucketing" not in case.rule
    diff = rel_diff(ours, t_out) if compare else None
    return CaseTime(case.rule, n, d, ours_ms, t_ms, n_ms, diff, case.note, case.byzfl is not None)


def progress_line(t: CaseTime) -> str:
    theirs = (f"byzfl torch {fmt(t.torch_ms)} ms, numpy {fmt(t.numpy_ms)} ms" if t.in_byzfl
              else "not in ByzFL")
    return f"  {t.rule} n={t.n} d={d_label(t.d)}: squall {fmt(t.squall_ms)} ms, {theirs}"


def run_round(sizes: list[tuple[int, int]], reps: int) -> Round:
    out = Round()
    for n, d in sizes:
        f = (n - 3) // 4  # the largest f every rule (Bulyan: n >= 4f+3) accepts
        G = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d))
        out.fused += fused_vs_eager(n, d, f, G, reps)
        for case in cases(n, f, G):
            t = measure_case(case, n, d, G, reps)
            out.cases.append(t)
            print(progress_line(t), flush=True)
        (bulyan_ms, _), (krum_ms, _) = timed(
            [partial(bulyan, G, f), partial(multi_krum, G, f)], reps
        )
        out.bulyan.append(BulyanTime(n, d, f, bulyan_ms, krum_ms))
    return out


# ------------------------------------------------------------------- over rounds: cells


def median_of(values: list[float]) -> float:
    """Median of the values that are numbers; NaN if none is."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def fmt(ms: float) -> str:
    return "error" if math.isnan(ms) else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def ms_cell(values: list[float]) -> str:
    return fmt(median_of(values))


def ratio_cell(ratios: list[float]) -> str:
    """`6.4x (5.9, 6.4, 7.1)`: the median over rounds, then each round's value."""
    if all(math.isnan(r) for r in ratios):
        return ""
    rounds = ", ".join("error" if math.isnan(r) else f"{r:.1f}" for r in ratios)
    median = f"{median_of(ratios):.1f}x"
    return median if len(ratios) == 1 else f"{median} ({rounds})"


def diff_cell(diffs: list[float | None]) -> str:
    """The largest relative difference over rounds."""
    numbers = [x for x in diffs if x is not None]
    return f"{max(numbers):.0e}" if numbers else ""


def d_label(d: int) -> str:
    return f"{d:.0e}"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def case_rows(rounds: list[Round]) -> list[list[str]]:
    rows = []
    for per_round in zip(*(r.cases for r in rounds)):
        t = per_round[0]
        byzfl = t.in_byzfl
        rows.append([
            t.rule, str(t.n), d_label(t.d),
            ms_cell([x.squall_ms for x in per_round]),
            ms_cell([x.torch_ms for x in per_round]) if byzfl else "n/a",
            ms_cell([x.numpy_ms for x in per_round]) if byzfl else "n/a",
            ratio_cell([speedup(x.torch_ms, x.squall_ms) for x in per_round]),
            ratio_cell([speedup(x.numpy_ms, x.squall_ms) for x in per_round]),
            diff_cell([x.diff for x in per_round]),
            t.note,
        ])
    return rows


def bulyan_rows(rounds: list[Round]) -> list[list[str]]:
    rows = []
    for per_round in zip(*(r.bulyan for r in rounds)):
        t = per_round[0]
        rows.append([
            str(t.n), d_label(t.d), str(t.f),
            ms_cell([x.bulyan_ms for x in per_round]),
            ms_cell([x.multi_krum_ms for x in per_round]),
            ratio_cell([speedup(x.bulyan_ms, x.multi_krum_ms) for x in per_round]),
        ])
    return rows


def fused_rows(rounds: list[Round]) -> list[list[str]]:
    rows = []
    for per_round in zip(*(r.fused for r in rounds)):
        t = per_round[0]
        rows.append([
            t.rule, str(t.n), d_label(t.d),
            ms_cell([x.eager_ms for x in per_round]),
            ms_cell([x.fused_ms for x in per_round]),
            ratio_cell([speedup(x.eager_ms, x.fused_ms) for x in per_round]),
            f"{t.compile_s:.1f}",
            diff_cell([x.diff for x in per_round]),
        ])
    return rows


# ----------------------------------------------------------------------------- verdicts


@dataclass
class Target:
    """A target on a set of cells, each with its value in every round: every cell's median
    over rounds must be at least (or, with at_least False, at most) `limit`."""

    name: str
    definition: str
    limit: float
    at_least: bool
    cells: dict[str, list[float]]

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.limit if self.at_least else value <= self.limit

    def worst(self) -> str:
        """The label of the cell that decides: the lowest median (the highest for at most)."""

        def badness(label: str) -> float:
            value = median_of(self.cells[label])
            return math.inf if math.isnan(value) else -value if self.at_least else value

        return max(self.cells, key=badness)

    def rounds_held(self) -> int:
        count = len(next(iter(self.cells.values())))
        return sum(all(self.holds(v[i]) for v in self.cells.values()) for i in range(count))


def series(
    rows_per_round: list[list], keep: Callable[[object], bool],
    label: Callable[[object], str], value: Callable[[object], float],
) -> dict[str, list[float]]:
    """label -> value in every round, for the rows `keep` selects (rounds list the same
    rows in the same order)."""
    return {
        label(per_round[0]): [value(row) for row in per_round]
        for per_round in zip(*rows_per_round)
        if keep(per_round[0])
    }


def where(row: CaseTime | BulyanTime) -> str:
    return f"n = {row.n}, d = {d_label(row.d)}"


def targets(rounds: list[Round]) -> list[Target]:
    cases_ = [r.cases for r in rounds]
    trimmed = series(cases_, lambda t: t.rule == "trimmed_mean", where,
                     lambda t: speedup(t.numpy_ms, t.squall_ms))
    bulyan_ = series([r.bulyan for r in rounds], lambda t: True, where,
                     lambda t: speedup(t.bulyan_ms, t.multi_krum_ms))
    distance: dict[str, list[float]] = {}
    for path in ("torch", "numpy"):
        distance |= series(
            cases_, lambda t: t.rule in DISTANCE_RULES and t.d == DISTANCE_D,
            lambda t, p=path: f"{t.rule} (n = {t.n}, vs {p})",
            lambda t, p=path: speedup(getattr(t, f"{p}_ms"), t.squall_ms))
    return [
        Target("trimmed_mean vs ByzFL's NumPy path",
               f"speed-up vs numpy (byzfl numpy ms / squall ms) >= {TRIMMED_MIN:g}x at every "
               "measured n, d", TRIMMED_MIN, True, trimmed),
        Target("Bulyan vs Multi-Krum (squall's own)",
               f"Bulyan's time at most {BULYAN_MAX:g}x Multi-Krum's: the ratio bulyan ms / "
               f"multi_krum ms of the Bulyan vs Multi-Krum table <= {BULYAN_MAX:g}x at every "
               "measured n, d", BULYAN_MAX, False, bulyan_),
        Target(f"distance rules at d = {d_label(DISTANCE_D)} vs both ByzFL paths",
               f"speed-up >= {DISTANCE_MIN:g}x for krum, multi_krum, krum on offset rows and "
               "geomed, against ByzFL's torch and NumPy paths; the lowest cell decides",
               DISTANCE_MIN, True, distance),
    ]


def verdict_row(target: Target) -> list[str]:
    if not target.cells:
        return [target.name, target.definition, "not measured in this run", "", "", ""]
    worst = target.worst()
    rounds = len(target.cells[worst])
    passed = target.holds(median_of(target.cells[worst]))
    every = "; ".join(f"{label}: {ratio_cell([median_of(v)]) or 'error'}"
                      for label, v in target.cells.items())
    return [
        target.name, target.definition, "**PASS**" if passed else "**FAIL**",
        f"{worst}: {ratio_cell(target.cells[worst])}",
        f"{target.rounds_held()} of {rounds}", every,
    ]


# ------------------------------------------------------------------------------ markdown


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header_lines(threads: int, reps: int, rounds: int, elapsed_s: float) -> list[str]:
    command = shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    order = ("each timed call right after an untimed one of the same implementation" if PAIRED
             else "each timed call right after the other implementations' (--cross)")
    return [
        f"Written {date} by `{command}` (from the repository root): {rounds} rounds in "
        f"{elapsed_s / 60:.1f} min.",
        "",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()}; load average "
        f"at the end {load}",
        f"- torch {torch.__version__}, numpy {np.__version__}, "
        f"byzfl {importlib.metadata.version('byzfl')}, Python {platform.python_version()}",
        f"- threads: {threads} for both libraries (torch.set_num_threads and threadpoolctl)",
        "- inputs: float32 N(0, 1), f = (n-3)//4, the same in every round; in a round each time",
        f"  is the median of {reps} calls after 1 warm-up; squall and ByzFL's two paths timed",
        f"  round-robin so that all see the same load, {order}",
        f"- rounds: the whole measurement (every table) ran {rounds} times, one after the other;",
        "  an ms cell is the median over rounds; a speed-up or ratio cell is the median over",
        "  rounds of that round's ratio, then each round's value in order: `6.4x (5.9, 6.4, 7.1)`",
        "- byzfl (torch) gets the torch tensor, byzfl (numpy) the same memory as a NumPy",
        "  array; speed-up = byzfl ms / squall ms; max rel. diff compares the outputs (largest",
        "  over rounds; ByzFL's Krum family uses n-f-1 neighbours and its geometric median",
        "  starts from 0, so those may differ by definition)",
    ]


def verdict_lines(rounds: list[Round]) -> list[str]:
    head = ["target", "definition", "verdict", "deciding cell: median (each round)",
            "rounds in which it held", "every cell (median over rounds)"]
    return [
        "## Verdicts",
        "",
        "Computed by the script from the tables below: PASS when the deciding cell's median",
        "over rounds meets the target; the rounds column counts the rounds in which every cell",
        "of the target met it with that round's numbers alone.",
        "",
        *md_table(head, [verdict_row(t) for t in targets(rounds)]),
    ]


def table_lines(rounds: list[Round], reps: int) -> list[str]:
    main_head = ["rule", "n", "d", "squall ms", "byzfl ms (torch)", "byzfl ms (numpy)",
                 "speed-up vs torch", "speed-up vs numpy", "max rel. diff vs byzfl", "note"]
    return [
        "## squall vs ByzFL",
        "",
        *md_table(main_head, case_rows(rounds)),
        "",
        "## Bulyan vs Multi-Krum (squall)",
        "",
        f"Timed alternately (bulyan, multi_krum, bulyan, ...), median of {reps} each per round;",
        "ratio = bulyan ms / multi_krum ms.",
        "",
        *md_table(["n", "d", "f", "bulyan ms", "multi_krum ms", "ratio"], bulyan_rows(rounds)),
        "",
        "## Compiled kernels vs eager torch (squall)",
        "",
        "On CPU, median, trimmed_mean and Bulyan's coordinate phase run as one compiled",
        "kernel (`strategies/kernels.py`, torch.compile) once it is ready, and as eager",
        "selection networks before that or with SQUALL_COMPILE=0. The distance rules (krum",
        "and geometric_median here; also Multi-Krum, Bulyan, NNM, centered clipping) take",
        "their Gram matrix from C (`strategies/distances.c`), eager from torch's matmul.",
        f"Timed alternately, median of {reps} per round. compile s (first round only; later",
        "rounds find the kernels compiled): from the first call until the kernel is ready,",
        "with empty compile caches (what a fresh machine pays once per (rule, n, f) for",
        "torch.compile, training going on eagerly meanwhile; once per machine for",
        "distances.c, on the first call, included in the first row that uses it). rel. diff:",
        "max |fused - eager| / max |eager|, largest over rounds.",
        "",
        *md_table(["rule", "n", "d", "eager ms", "fused ms", "speed-up", "compile s", "rel. diff"],
                  fused_rows(rounds)),
    ]


def report(rounds: list[Round], threads: int, reps: int, elapsed_s: float) -> str:
    """The generated part of the markdown file (between the markers)."""
    return "\n".join([
        *header_lines(threads, reps, len(rounds), elapsed_s),
        "",
        *verdict_lines(rounds),
        "",
        *table_lines(rounds, reps),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, prints only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    parser.add_argument(
        "--cross", action="store_true", help="time each call right after the other implementations'"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        parser.error("--rounds and --reps must be at least 1")
    global PAIRED
    PAIRED = not args.cross
    torch.set_num_threads(args.threads)
    # An empty compile cache: the compile times reported are those of a fresh machine.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="squall-bench-inductor-")
    tempfile.tempdir = tempfile.mkdtemp(prefix="squall-bench-kernels-")  # distances.c's cache
    os.environ["SQUALL_COMPILE"] = "1"
    if args.quick:
        sizes, reps = [(8, 1000), (11, 5000)], 2
    else:
        sizes, reps = [(n, d) for n in (16, 32) for d in (10**5, 10**6)], args.reps
    start = time.perf_counter()
    rounds = []
    with threadpool_limits(limits=args.threads), torch.no_grad():
        for i in range(args.rounds):
            print(f"round {i + 1} of {args.rounds} ({(time.perf_counter() - start) / 60:.1f} min)",
                  flush=True)
            rounds.append(run_round(sizes, reps))
    text = report(rounds, args.threads, reps, time.perf_counter() - start)
    if args.quick:
        print(text)
    else:
        write_generated(args.out, TITLE, text, NOTES_STUB)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
