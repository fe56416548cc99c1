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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

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
NOTES = """\
## Notes

- Threads: 1 unless `--threads` says otherwise. On a shared 2-core machine a 2-thread OpenMP
  region stalls for a scheduler slice (~8 ms) whenever another process holds a core, which
  swamps millisecond timings. Single cells can be off by ~1.5x between runs (compare `mean`,
  where both libraries call the same torch.mean).
- Order: the implementations of a case take turns, and each timed call follows an untimed
  call of the same implementation. Timed right after another implementation instead
  (`--cross`, the order of earlier versions of this file), a millisecond call runs in the
  state the other one left: after ByzFL's NumPy Krum (scipy cdist, hundreds of MB of
  temporaries) even squall's small torch calls and plain Python run ~40% slower for a while
  (not a cache effect: reading a 64 MB buffer in between does not remove it, and it
  outlasts a 200 ms sleep), and squall's Krum at n = 16, d = 1e5 takes 1.3 ms instead of
  0.35; ByzFL's own times swing up to 3x in that order. The ratios of a `--cross` run are
  in the last note.
- median, trimmed_mean and Bulyan's coordinate phase need a few order statistics per column,
  not a sort. On CPU torch.sort along dim 0 costs ~300 ns per column (torch.topk and
  torch.kthvalue along dim 0 as much: 50-60 ms at n = 32, d = 1e5), so squall uses Parberry's
  pairwise sorting network pruned to the comparators the wanted ranks depend on (98 min/max
  values per column for the trimmed mean at n = 16, 294 at n = 32; 88 and 260 for the
  median). The trimmed mean is then sum(clamp(x, lo, hi)) - f lo - f hi with lo, hi the
  values of ranks f and n-1-f (every term lies in [lo, hi]: no cancellation). On CUDA squall
  uses torch.sort.
- Fused kernels (the table above): in eager torch that network is 30-60 calls, each a pass
  over a chunk of columns through L2/L3 (~0.15 ns per value), close to a full sort in
  passes, while NumPy 2's np.sort sorts each column of 16-32 floats in SIMD registers: eager,
  the trimmed mean was only 1.2-2.3x faster than ByzFL's NumPy path. torch.compile turns the
  network and the arithmetic after it into one loop over the columns that keeps a column's n
  values in vector registers and reads G once. torch's fusion limit (64 nodes) is raised for
  these compiles: with it, the trimmed mean at n = 32 became three loops storing ~30
  intermediate rows (1.6 ms at d = 1e5, 34 ms at d = 1e6, against 0.9 and 11 ms as one
  loop). Compiling is per (rule, n, f), on a helper thread while the eager version serves;
  the eager rules run the same per-column arithmetic in the same order, so both give the
  same bits (rel. diff 0). tests/test_kernels.py checks the kernels against the slow
  references and the eager rules.
- trimmed_mean vs ByzFL's NumPy path (target: 3x): met, 4.7-6.7x at d = 1e5 and 6.0-9.0x at
  d = 1e6 over the three runs of this version (NumPy's time at d = 1e6 swings with the
  machine's memory traffic).
- Krum, Multi-Krum, Bulyan, NNM, geometric median, centered clipping: one Gram matrix, on CPU
  from `strategies/distances.c` for float32 (torch's matmul otherwise). torch has no
  symmetric product and its G @ G.T computes every dot product twice; the C kernel computes
  the upper triangle in 4 x 4 tiles of rows whose 16 dot products stay in vector registers
  over 1024-column chunks that stay in L2, prefetches the next chunk during the first pass
  over a chunk (otherwise each 4 KiB page of each row stalls the hardware prefetcher: 0.45
  vs 0.35 ms at n = 16, d = 1e5 with cold caches), and sums each lane over at most 64 products
  in float32, then in float64. Alone and warm on one core: 0.22 vs 0.62 ms for torch's GEMM
  at n = 16, d = 1e5, 0.27 vs 1.20 ms at 17 rows (the geometric median adds the origin as a
  row, and MKL is slow at 17 and 33), 0.9 vs 2.3 ms at n = 32, 4.5 vs 8.4 and 12.4 vs 27 ms
  at d = 1e6. MKL's GEMM ran at ~70% of what this core does, not ~85% as an earlier version
  of this note assumed. The kernel subtracts a centre row in registers at no cost, so the
  rules start centred on row 0: rows with a common component much larger than their spread
  (the "offset rows" line) take one pass instead of a raw and a centred one; a second pass
  is left for a row 0 far from the bulk. Geometric median and centered clipping iterate on
  n weights over the Gram matrix (the Weiszfeld loop in C too: ~1 us an iteration), so
  their cost does not grow with the number of iterations, while ByzFL reads G again at
  every iteration.
- Geometric median: ByzFL's GeometricMedian has no tolerance (a fixed T, starting from 0); it
  gets T = the iterations squall needs to reach tol 1e-6 at nu 1e-6 on the same input. These
  isotropic inputs need only 3-4; inputs that need more widen the gap.
- Bulyan vs Multi-Krum (target: 2x): met, over the three runs 1.7-1.8x (n = 16) and 1.4x
  (n = 32) at d = 1e5, 1.0-1.2x at d = 1e6. Bulyan is Multi-Krum's Gram matrix, theta =
  n - 2f Krum rounds on the distance matrix (in C: each row's neighbours sorted once, ~1 us
  a round, against ~20 us of torch calls), then per column the selected values within
  beta - 1 ranks of their median (ranks 1-8 of 10 at n = 16, 5-12 of 18 at n = 32) and the
  mean of the beta closest to the median (pairs Y[j], Y[j+beta] of that band keep their
  closer value), all in one fused kernel that gathers the theta selected rows itself. With
  Multi-Krum 2-3x faster than before, that coordinate phase (0.4 ms at n = 16, d = 1e5) is
  most of the gap.
- Distance rules at d = 1e5 (target: 3x against both ByzFL paths): met. Over the three runs
  of this version: the lowest ratios, all against ByzFL's torch path at n = 32, are
  Krum 4.7-4.9x, Multi-Krum 4.3-5.3x, Krum on offset rows 4.1-5.0x, the geometric median
  5.6-5.8x (at n = 16 it is 4.6-5.4x against the NumPy path); at n = 16 Krum and Multi-Krum
  run 9.5-20x faster. In the `--cross` order (one run) all cells but one stay at 3.0x or
  more (the lowest: Multi-Krum at n = 32, 3.0x); the geometric median at n = 16 gets 3.2x
  against the torch path but 2.8x against NumPy, its 0.7-0.9 ms then taking 1.7 ms. The
  previous version (torch's GEMM, a second pass for offset rows, Bulyan's rounds in torch)
  reached 2.0-2.3x for Krum and Multi-Krum at n = 32, 1.0-1.9x on offset rows and 1.8-2.6x
  for the geometric median, in the `--cross` order.
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


def fused_vs_eager(n: int, d: int, f: int, G: torch.Tensor, reps: int) -> list[str]:
    """Rows of the compiled-kernel table: the order-statistic rules and two Gram-matrix rules
    compiled and eager (the eager one runs with SQUALL_COMPILE=0), and the seconds the first
    compile took."""
    rows = []
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
        rows.append(
            f"| {rule} | {n} | {d:.0e} | {fmt(eager_ms)} | {fmt(fused_ms)} | "
            f"{ratio(eager_ms, fused_ms)} | {compile_s:.1f} | {diff:.0e} |"
        )
        print(rows[-1], flush=True)
    return rows


def run(
    sizes: list[tuple[int, int]], reps: int
) -> tuple[list[list[str]], list[str], list[str]]:
    rows, bulyan_rows, fused_rows = [], [], []
    for n, d in sizes:
        f = (n - 3) // 4  # the largest f every rule (Bulyan: n >= 4f+3) accepts
        G = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d))
        fused_rows += fused_vs_eager(n, d, f, G, reps)
        for case in cases(n, f, G):
            X = G + case.offset if case.offset else G
            A = X.numpy()  # same memory, ByzFL's NumPy path
            fns = [partial(case.squall, X)]
            if case.byzfl is not None:  # a fresh ByzFL aggregator per call, on each input type
                fns += [lambda c=case, X=X: c.byzfl()(X), lambda c=case, A=A: c.byzfl()(A)]
            (ours_ms, ours), *theirs = timed(fns, reps)
            (t_ms, t_out), (n_ms, n_out) = theirs or [(math.nan, None)] * 2
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
        (bulyan_ms, _), (krum_ms, _) = timed(
            [partial(bulyan, G, f), partial(multi_krum, G, f)], reps
        )
        bulyan_rows.append(
            f"| {n} | {d:.0e} | {f} | {fmt(bulyan_ms)} | {fmt(krum_ms)} | "
            f"{bulyan_ms / krum_ms:.1f}x |"
        )
    return rows, bulyan_rows, fused_rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(
    rows: list[list[str]], bulyan_rows: list[str], fused_rows: list[str], threads: int, reps: int
) -> str:
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
            f"at the end {load}",
            f"- torch {torch.__version__}, numpy {np.__version__}, "
            f"byzfl {importlib.metadata.version('byzfl')}, Python {platform.python_version()}",
            f"- threads: {threads} for both libraries (torch.set_num_threads and threadpoolctl)",
            f"- inputs: float32 N(0, 1), f = (n-3)//4; median of {reps} runs after 1 warm-up;",
            "  squall and ByzFL's two paths timed round-robin so that all see the same load,",
            "  "
            + (
                "each timed call right after an untimed one of the same implementation"
                if PAIRED
                else "each timed call right after the other implementations' (--cross)"
            ),
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
            "## Compiled kernels vs eager torch (squall)",
            "",
            "On CPU, median, trimmed_mean and Bulyan's coordinate phase run as one compiled",
            "kernel (`strategies/kernels.py`, torch.compile) once it is ready, and as eager",
            "selection networks before that or with SQUALL_COMPILE=0. The distance rules (krum",
            "and geometric_median here; also Multi-Krum, Bulyan, NNM, centered clipping) take",
            "their Gram matrix from C (`strategies/distances.c`), eager from torch's matmul.",
            f"Timed alternately, median of {reps}. compile s: from the first call until the",
            "kernel is ready, with empty compile caches (what a fresh machine pays once per",
            "(rule, n, f) for torch.compile, training going on eagerly meanwhile; once per",
            "machine for distances.c, on the first call, included in the first row that uses",
            "it). rel. diff: max |fused - eager| / max |eager|.",
            "",
            "| rule | n | d | eager ms | fused ms | speed-up | compile s | rel. diff |",
            "|---|---|---|---|---|---|---|---|",
            *fused_rows,
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
    parser.add_argument(
        "--cross", action="store_true", help="time each call right after the other implementations'"
    )
    args = parser.parse_args(argv)
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
    with threadpool_limits(limits=args.threads), torch.no_grad():
        rows, bulyan_rows, fused_rows = run(sizes, reps)
    text = report(rows, bulyan_rows, fused_rows, args.threads, reps)
    if args.quick:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
