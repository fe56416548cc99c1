"""Fused CPU kernels for the order-statistic rules (median, trimmed mean, Bulyan).

In eager torch a pruned selection network runs as 30-60 calls, each a pass over a chunk of
columns (`aggregators._order_statistics`). torch.compile turns the network and the
arithmetic after it into one loop over the columns that keeps a column's n values in vector
registers: the median and the trimmed mean 4-6x faster on CPU (benchmarks/aggregators.md).

A kernel depends on n (the network's shape), so it is compiled for each (rule, n, f) seen,
which takes seconds. That happens on a helper thread: the rule returns the eager result until
its kernel is ready, so no training step waits for a compiler. Compiled kernels never
recompile on the caller's thread: a call that would (an input shape the kernel was not
compiled for) raises inside torch and the rule takes the eager path. If compiling fails (no
C++ compiler, say) the reason is logged once and the eager path stays.

SQUALL_COMPILE=0 keeps every rule eager (the test suite sets it; tests/test_kernels.py not).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

INF = float("inf")

Comparators = tuple[tuple[int, int, bool, bool], ...]

EXAMPLE_WIDTH = 4096  # columns of the input a kernel is compiled with (the width is dynamic)

_ready: dict[Hashable, Callable[..., Tensor]] = {}
_queued: set[Hashable] = set()
_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_lock = threading.Lock()
_helper: threading.Thread | None = None
_warned = False


def enabled(G: Tensor) -> bool:
    """Whether rules on G use compiled kernels: CPU float tensors, unless SQUALL_COMPILE=0."""
    return (
        os.environ.get("SQUALL_COMPILE", "1") != "0"
        and G.device.type == "cpu"
        and G.dtype in (torch.float32, torch.float64)
        and hasattr(torch.compiler, "set_stance")  # torch >= 2.6
    )


def kernel(
    key: Hashable, body: Callable[..., Tensor], example: Callable[[], tuple]
) -> Callable[..., Tensor] | None:
    """The compiled `body` for `key` if it is ready, else None (and its compile is queued).

    `example()` gives arguments of the shapes and dtypes it will be called with (the last
    dimension of tensors may differ: it is dynamic).
    """
    with _lock:
        if key in _ready or key in _queued:
            return _ready.get(key)
        _queued.add(key)
    _submit(lambda: _compile(key, body, example))
    return None


def wait() -> None:
    """Block until every queued compile has finished (benchmarks, tests)."""
    done = threading.Event()
    _submit(done.set)
    done.wait()


def run(compiled: Callable[..., Tensor], *args: Tensor) -> Tensor | None:
    """compiled(*args), or None when torch would have to recompile it for these inputs.

    Always on contiguous inputs and without autograd, as compiled (torch guards both).
    """
    try:
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            return compiled(*(a.contiguous() for a in args))
    except Exception:  # any failure here means: use the eager path
        return None


def network(rows: list[Tensor], comparators: Comparators) -> None:
    """Run comparators (i, j, keep_min, keep_max) on rows in place: row i gets the min, row j
    the max, outputs nobody reads are not computed."""
    for i, j, keep_min, keep_max in comparators:
        low = torch.minimum(rows[i], rows[j]) if keep_min else rows[i]
        high = torch.maximum(rows[i], rows[j]) if keep_max else rows[j]
        rows[i], rows[j] = low, high


def _submit(job: Callable[[], None]) -> None:
    """Run job on the helper thread (a daemon: a compile in progress never holds up exit)."""
    global _helper
    with _lock:
        if _helper is None:
            _helper = threading.Thread(target=_work, name="squall-compile", daemon=True)
            _helper.start()
    _jobs.put(job)


def _work() -> None:
    global _warned
    while True:
        job = _jobs.get()
        try:
            job()
        except Exception as error:  # reported once, the eager path stays
            if not _warned:
                _warned = True
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                log.warning(
                    "compiling a fused aggregation kernel failed, the eager version is used "
                    "(SQUALL_COMPILE=0 skips compiling): %s",
                    reason,
                )


def _compile(key: Hashable, body: Callable[..., Tensor], example: Callable[[], tuple]) -> None:
    import torch._inductor.config as inductor  # here: importing the compiler takes seconds

    # A fresh top-level function per kernel: torch caches compiled code per code object and
    # stops compiling one after a few variants (the inlined `body` may be shared).
    namespace: dict = {"body": body}
    exec("def kernel(*args):\n    return body(*args)\n", namespace)
    compiled = torch.compile(namespace["kernel"], dynamic=True)
    # One compiler process (the default is a pool). A larger fusion limit than torch's 64
    # nodes: a network of a few hundred min/max then stays one loop with its rows in
    # registers, instead of loops that store ~16-30 intermediate rows (trimmed mean, n = 32:
    # 1.6x faster at d = 1e5, 3x at d = 1e6). torch's warning that a CUDA build finds no CUDA
    # runtime is noise here.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level, start = quiet.level, time.perf_counter()
    quiet.setLevel(logging.ERROR)
    try:
        with inductor.patch(compile_threads=1, max_fusion_size=1024), torch.no_grad():
            compiled(*example())
    finally:
        quiet.setLevel(level)
    log.debug("compiled %s in %.1f s", key, time.perf_counter() - start)
    with _lock:
        _ready[key] = compiled


# --------------------------------------------------------------------------- per-column math
# Shared by the compiled kernels and the eager path (`aggregators`), with the same operations
# in the same order: IEEE basic arithmetic is exact to the bit whoever runs it, so the two
# paths give identical results (a kernel that becomes ready mid-run changes nothing, and a
# resumed run matches the uninterrupted one).


def middle(a: Tensor, b: Tensor) -> Tensor:
    """The true median from the two middle order statistics (equal for odd counts)."""
    return (a + b) * 0.5


def clamped_mean(rows: Sequence[Tensor], lo: Tensor, hi: Tensor, f: int) -> Tensor:
    """Mean of the n - 2f middle values per column, from lo and hi, the values of ranks f and
    n-1-f: clamping to [lo, hi] turns the f dropped values below into lo and the f above
    into hi, so the kept values sum to sum(clamp(x, lo, hi)) - f lo - f hi (no cancellation:
    all terms lie in [lo, hi]). An infinite lo or hi is itself kept (more than f
    infinities): the sum already is +-inf, subtracting it would turn it into NaN."""
    total = torch.clamp(rows[0], lo, hi)
    for row in rows[1:]:
        total = total + torch.clamp(row, lo, hi)
    total = total - f * lo.nan_to_num(posinf=0.0, neginf=0.0)
    total = total - f * hi.nan_to_num(posinf=0.0, neginf=0.0)
    return total / (len(rows) - 2 * f)


def closest_mean(Y: Sequence[Tensor], beta: int) -> Tensor:
    """Per column of the rows Y, sorted, m <= 2 beta of them: the mean of the beta values
    closest to the median, the lower one on ties in distance (as a stable sort by distance).

    The m - beta values left out are the farthest, taken from both ends: from the distances
    below (falling from Y[0]) and above (falling from Y[m-1]), the m - beta largest are the
    larger of each pair Y[j], Y[j + beta] (a half-cleaner on two sorted lists). So each pair
    keeps its closer value and Y[m-beta:beta] are all kept.
    """
    m = len(Y)
    twice_median = Y[(m - 1) // 2] + Y[m // 2]
    total = None
    for below, above in zip(Y[: m - beta], Y[beta:]):
        # below is at least as close as above iff below + above >= 2 med; clamp(t, below,
        # above) keeps below for t = -inf and above for t = +inf (on CPU ~15x faster than
        # torch.where on a bool mask)
        t = ((below + above >= twice_median).to(below.dtype) - 0.5) * -INF
        kept = torch.clamp(t, below, above)
        total = kept if total is None else total + kept
    for row in Y[m - beta : beta]:
        total = row if total is None else total + row
    return total / beta


# --------------------------------------------------------------------------- kernel bodies
# Their leading parameters are bound with functools.partial. Each takes G (n, d) as it is:
# NaN is not mapped to +inf (minimum / maximum propagate NaN to the outputs, and the rule
# redoes such an input on its eager path, which does).


def median_body(comparators: Comparators, ranks: tuple[int, int], G: Tensor) -> Tensor:
    """Coordinate-wise (true) median."""
    rows = list(G.unbind(0))
    network(rows, comparators)
    return middle(rows[ranks[0]], rows[ranks[1]])


def trimmed_mean_body(
    comparators: Comparators, ranks: tuple[int, int], f: int, G: Tensor
) -> Tensor:
    """Coordinate-wise trimmed mean, from the values of ranks f and n-1-f."""
    rows = list(G.unbind(0))
    stats = list(rows)
    network(stats, comparators)
    return clamped_mean(rows, stats[ranks[0]], stats[ranks[1]], f)


def bulyan_body(
    beta: int, comparators: Comparators, band: tuple[int, ...], G: Tensor, chosen: Tensor
) -> Tensor:
    """Bulyan's coordinate phase on the rows `chosen`."""
    rows = list(G.index_select(0, chosen).unbind(0))
    network(rows, comparators)
    return closest_mean([rows[r] for r in band], beta)
