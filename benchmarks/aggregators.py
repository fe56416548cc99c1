"""Time squall's aggregation rules against ByzFL on identical float32 inputs.

    .venv/bin/python -m benchmarks.aggregators            # full run, writes aggregators.md
    .venv/bin/python -m benchmarks.aggregators --quick    # tiny smoke run

ByzFL (`pip install byzfl`, benchmark-only) accepts torch tensors and NumPy arrays and
switches backend on the type; both paths are timed, on the same values. Both libraries get
the same thread budget: torch.set_num_threads for torch and threadpoolctl for the BLAS /
OpenMP pools NumPy and SciPy use.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from strategies import aggregators as agg
from strategies import preaggregation as pre

try:
    from byzfl.aggregators import aggregators as bz
    from byzfl.aggregators import preaggregators as bzpre
except ImportError:  # pragma: no cover - benchmark-only dependency
    sys.exit("benchmarks/aggregators.py needs ByzFL: .venv/bin/pip install byzfl")

NU, TOL = 1e-6, 1e-6  # geometric median smoothing and tolerance
TAU, ITERS = 1.0, 3  # centered clipping
BUCKET = 2
NOTES = """\
## Notes

- Threads: 1 unless `--threads` says otherwise. On a shared 2-core machine a 2-thread OpenMP
  region stalls for a scheduler slice (~8 ms) whenever another process holds a core, which
  swamps millisecond timings. Other jobs ran during this benchmark: single cells can be off
  by ~1.5x (compare `mean`, where both libraries call the same torch.mean).
- median, trimmed_mean and Bulyan's coordinate phase: torch.sort along dim 0 costs ~300 ns per
  column on CPU, so squall sorts column chunks (sized to stay in L3) with a bitonic network of
  torch.minimum/maximum; N = n rounded up to a power of two, log2(N)(log2(N)+1)/2 passes over
  the chunk. Those passes bound it. ByzFL's NumPy TrMean calls np.sort, which in NumPy 2 is
  a SIMD sort in registers (x86-simd-sort): pure torch has no equivalent, so against that path
  squall's trimmed mean is only about as fast (the 3x target is met against ByzFL's torch path
  only). On CUDA squall uses torch.sort.
- Krum, Multi-Krum, NNM, geometric median, centered clipping: one float32 Gram matrix in
  column chunks accumulated in float64, plus a second, centred pass only when the rows share a
  common component much larger than their spread (the "offset rows" line). At d = 1e5 the
  GEMM flops (2 n^2 d) bound it. Geometric median and centered clipping iterate on n weights
  over the Gram matrix, so their cost does not grow with the number of iterations, while
  ByzFL reads G again at every iteration.
- Geometric median: ByzFL's GeometricMedian has no tolerance (a fixed T, starting from 0); it
  gets T = the iterations squall needs to reach tol 1e-6 at nu 1e-6 on the same input. These
  isotropic inputs need only 3-4; inputs that need more widen the gap.
- Bulyan vs Multi-Krum: Bulyan is Multi-Krum's Gram matrix plus a coordinate-wise sort of
  theta = n - 2f rows (10 -> 16 and 18 -> 32 rows once padded here) and the closest-window
  mean. The sort alone costs about a coordinate-wise median, several times squall's
  Multi-Krum, so the 2x target is missed: the ratio is large because Multi-Krum is cheap.
"""
OFFSET = 10.0  # common component added to every row for the "offset rows" case


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
    K, _ = agg._geomed_gram(G)
    _, iters = agg._weiszfeld(K, NU, TOL, 1000, torch.finfo(G.dtype).tiny)
    gen = torch.Generator().manual_seed(0)
    return [
        Case("mean", agg.mean, bz.Average),
        Case("median", agg.median, bz.Median),
        Case("trimmed_mean", lambda G: agg.trimmed_mean(G, f), lambda: bz.TrMean(f)),
        Case("krum", lambda G: agg.krum(G, f), lambda: bz.Krum(f), "ByzFL: n-f-1 neighbours"),
        Case(
            "multi_krum",
            lambda G: agg.multi_krum(G, f),
            lambda: bz.MultiKrum(f),
            "ByzFL: n-f-1 neighbours",
        ),
        Case(
            "krum, offset rows",
            lambda G: agg.krum(G, f),
            lambda: bz.Krum(f),
            f"rows + {OFFSET:g}: squall recomputes a centred Gram matrix",
            offset=OFFSET,
        ),
        Case("bulyan", lambda G: agg.bulyan(G, f), None, "not in ByzFL"),
        Case(
            "geomed",
            lambda G: agg.geometric_median(G, nu=NU, tol=TOL),
            lambda: bz.GeometricMedian(nu=NU, T=iters),
            f"{iters} Weiszfeld iterations each (tol {TOL:g}, nu {NU:g})",
        ),
        Case(
            "centered_clip",
            lambda G: agg.centered_clip(G, tau=TAU, iters=ITERS),
            lambda: bz.CenteredClipping(L=ITERS, tau=TAU),
            f"tau {TAU:g}, {ITERS} iterations",
        ),
        Case("sign_vote", agg.sign_vote, None, "not in ByzFL"),
        Case("nnm (pre)", lambda G: pre.nnm(G, f), lambda: bzpre.NNM(f)),
        Case(
            "bucketing (pre)",
            lambda G: pre.bucketing(G, BUCKET, gen),
            lambda: bzpre.Bucketing(BUCKET),
            f"s={BUCKET}; the random permutations differ",
        ),
    ]


def timed(fn: Callable[[], object], reps: int) -> tuple[float, object]:
    """(median ms over reps after one warm-up, warm-up result); NaN ms if it raises."""
    try:
        result = fn()
    except Exception as err:  # e.g. torch.quantile's input size limit inside ByzFL
        return math.nan, err
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, result


def interleaved(a: Callable[[], object], b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median ms of a and of b, timed alternately so that both see the same machine load."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def rel_diff(ours: torch.Tensor, theirs: object) -> str:
    if isinstance(theirs, Exception):
        return ""
    theirs = torch.as_tensor(np.asarray(theirs) if not torch.is_tensor(theirs) else theirs)
    if theirs.shape != ours.shape:
        return ""
    scale = theirs.abs().max().clamp_min(1e-30)
    return f"{((ours - theirs.to(ours.dtype)).abs().max() / scale).item():.0e}"


def fmt(ms: float) -> str:
    return "error" if math.isnan(ms) else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def ratio(a: float, b: float) -> str:
    return "" if math.isnan(a) or math.isnan(b) else f"{a / b:.1f}x"


def run(sizes: list[tuple[int, int]], reps: int) -> tuple[list[list[str]], list[str]]:
    rows, bulyan_rows = [], []
    for n, d in sizes:
        f = (n - 3) // 4  # the largest f every rule (Bulyan: n >= 4f+3) accepts
        G = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d))
        timings = {}
        for case in cases(n, f, G):
            X = G + case.offset if case.offset else G
            A = X.numpy()  # same memory, ByzFL's NumPy path
            ours_ms, ours = timed(lambda c=case, X=X: c.squall(X), reps)
            t_ms, t_out = n_ms, n_out = math.nan, None
            if case.byzfl is not None:
                t_ms, t_out = timed(lambda c=case, X=X: c.byzfl()(X), reps)
                n_ms, n_out = timed(lambda c=case, X=A: c.byzfl()(X), reps)
            timings[case.rule] = ours_ms
            agree = rel_diff(ours, t_out) if case.byzfl and "bucketing" not in case.rule else ""
            rows.append(
                [
                    case.rule,
                    str(n),
                    f"{d:.0e}",
                    fmt(ours_ms),
                    fmt(t_ms) if case.byzfl else "n/a",
                    fmt(n_ms) if case.byzfl else "n/a",
                    ratio(t_ms, ours_ms),
                    ratio(n_ms, ours_ms),
                    agree,
                    case.note,
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        bulyan_ms, krum_ms = interleaved(
            partial(agg.bulyan, G, f), partial(agg.multi_krum, G, f), reps
        )
        bulyan_rows.append(
            f"| {n} | {d:.0e} | {f} | {fmt(bulyan_ms)} | {fmt(krum_ms)} | "
            f"{bulyan_ms / krum_ms:.1f}x |"
        )
    return rows, bulyan_rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[list[str]], bulyan_rows: list[str], threads: int, reps: int) -> str:
    command = shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])
    head = [
        "rule",
        "n",
        "d",
        "squall ms",
        "byzfl ms (torch)",
        "byzfl ms (numpy)",
        "speed-up vs torch",
        "speed-up vs numpy",
        "max rel. diff vs byzfl",
        "note",
    ]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(
        [
            "# Aggregation rules: squall vs ByzFL",
            "",
            f"Produced by `{command}` (from the repository root).",
            "",
            f"- machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()}; load average "
            f"at the end {load} (a shared machine: other jobs were running)",
            f"- torch {torch.__version__}, numpy {np.__version__}, "
            f"byzfl {importlib.metadata.version('byzfl')}, Python {platform.python_version()}",
            f"- threads: {threads} for both libraries (torch.set_num_threads and threadpoolctl)",
            f"- inputs: float32 N(0, 1), f = (n-3)//4; median of {reps} timed runs after 1 warm-up",
            "- byzfl (torch) gets the torch tensor, byzfl (numpy) the same memory as a NumPy",
            "  array; speed-up = byzfl ms / squall ms; max rel. diff compares the outputs",
            "  (ByzFL's Krum family uses n-f-1 neighbours and its geometric median starts from 0,",
            "  so those may differ by definition)",
            "",
            *table,
            "",
            "## Bulyan vs Multi-Krum (squall)",
            "",
            f"Timed alternately (bulyan, multi_krum, bulyan, ...), median of {reps} each.",
            "",
            "| n | d | f | bulyan ms | multi_krum ms | ratio |",
            "|---|---|---|---|---|---|",
            *bulyan_rows,
            "",
            NOTES,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, prints only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes, reps = [(8, 1000), (11, 5000)], 2
    else:
        sizes, reps = [(n, d) for n in (16, 32) for d in (10**5, 10**6)], args.reps
    with threadpool_limits(limits=args.threads), torch.no_grad():
        rows, bulyan_rows = run(sizes, reps)
    text = report(rows, bulyan_rows, args.threads, reps)
    if args.quick:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
