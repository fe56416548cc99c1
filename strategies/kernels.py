"""Compiled CPU kernels: fused order-statistic rules (median, trimmed mean, Bulyan), and the
Gram matrix and Bulyan's selection for the distance rules.

In eager torch a pruned selection network runs as 30-60 calls, each a pass over a chunk of
columns (`aggregators._order_statistics`). torch.compile turns the network and the
arithmetic after it into one loop over the columns that keeps a column's n values in vector
registers: the median and the trimmed mean 4-6x faster on CPU (benchmarks/aggregators.md).

A kernel depends on n (the network's shape), so it is compiled for each (rule, n, f) seen,
which takes seconds. That happens on a helper thread: the rule returns the eager result until
its kernel is ready, so no training step waits for a compiler. At interpreter exit the
compile in progress is finished (queued ones are dropped) and the thread joined, before
Python's finalization: a daemon thread still inside torch's C++ code then is ended by
pthread_exit when it retakes the GIL, whose forced unwind through torch's noexcept frames
aborts the process ("terminate called without an active exception", exit 134) or crashes
it, after the program's output. Compiled kernels never
recompile on the caller's thread: a call that would (an input shape the kernel was not
compiled for) raises inside torch and the rule takes the eager path. If compiling fails (no
C++ compiler, say) the reason is logged once and the eager path stays.

The distance rules (Krum, Multi-Krum, Bulyan, NNM, geometric median, centered clipping) take
their Gram matrix, Bulyan its iterated Krum selection and the geometric median its Weiszfeld
iterations from a small C file, `distances.c`: the symmetric product torch lacks (1.9-4.4x
faster than its GEMM for 16-33 rows on one core, Krum as a whole 2-2.5x), and loops without
a torch call per step. It is compiled once per machine (cc, a fraction of a second, cached
in the temp directory) on first use, on the caller's thread: every step of a run, the first
one included, then gets the same bits. Without a C compiler torch stays, after one logged
line.

SQUALL_COMPILE=0 keeps everything eager (the test suite sets it; tests/test_kernels.py and
tests/test_distance_kernels.py, and the `gram_path` tests of test_aggregators.py not).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import getpass
import hashlib
import logging
import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

INF = float("inf")

Comparators = tuple[tuple[int, int, bool, bool], ...]

EXAMPLE_WIDTH = 4096  # columns of the input a kernel is compiled with (the width is dynamic)

_ready: dict[Hashable, Callable[..., Tensor]] = {}
_queued: set[Hashable] = set()
_jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
_lock = threading.Lock()
_helper: threading.Thread | None = None
_stopping = False  # set at exit: no compile starts any more
_warned = False


class _Compile:
    """A compile job on the helper's queue (dropped at exit, unlike `wait`'s markers)."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run

    def __call__(self) -> None:
        self.run()


def _compiling() -> bool:
    return os.environ.get("SQUALL_COMPILE", "1") != "0"


def enabled(G: Tensor) -> bool:
    """Whether rules on G use compiled kernels: CPU float tensors, unless SQUALL_COMPILE=0."""
    return (
        _compiling()
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
    _submit(_Compile(lambda: _compile(key, body, example)))
    return None


def wait() -> None:
    """Block until every queued compile has finished (benchmarks, tests)."""
    done = threading.Event()
    if _submit(done.set):
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


def _submit(job: Callable[[], None]) -> bool:
    """Run job on the helper thread; False (and nothing runs) once the interpreter exits."""
    global _helper
    with _lock:
        if _stopping:
            return False
        if _helper is None:
            # A daemon, so that exit never waits for compiles still queued; `_stop` ends it.
            _helper = threading.Thread(target=_work, name="squall-compile", daemon=True)
            _helper.start()
            atexit.register(_stop)
        _jobs.put(job)
    return True


def _stop() -> None:
    """At exit (atexit): drop the queued compiles, let the one in progress finish, and join
    the helper, so that no thread runs torch code while the interpreter finalizes."""
    global _stopping
    with _lock:
        _stopping = True
        helper = _helper
        _jobs.put(None)  # after every job queued so far: the helper returns there
    if helper is not None and helper is not threading.current_thread():
        helper.join()


def _work() -> None:
    global _warned
    while True:
        job = _jobs.get()
        if job is None:
            return
        if _stopping and isinstance(job, _Compile):
            continue  # exiting: a compile nobody will use
        try:
            job()
        except Exception as error:  # reported once, the eager path stays
            # A compile cut short by the exit (torch cannot start its helpers any more) is
            # nobody's concern.
            if not _warned and not _stopping:
                _warned = True
                _report("a fused aggregation kernel", "the eager version", error)


def _report(kernel: str, fallback: str, error: Exception) -> None:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    log.warning(
        "compiling %s failed, %s is used (SQUALL_COMPILE=0 skips compiling): %s",
        kernel,
        fallback,
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


# --------------------------------------------------------------------------- distance kernels

GRAM_BLOCK = 1 << 16  # columns per call of the C kernel: the unit of threads and of summing
_C_SOURCE = Path(__file__).with_name("distances.c")
_threads: ThreadPoolExecutor | None = None


def gram_applies(*operands: Tensor) -> bool:
    """Whether `gram` takes these operands (G, extra rows, centre): float32 CPU tensors of
    one width whose rows are contiguous, a C compiler at hand, and compiling on."""
    d = operands[0].shape[-1]
    return all(
        t.dtype == torch.float32 and 1 <= t.dim() <= 2 and t.shape[-1] == d
        and t.stride(-1) == 1 and t.numel() > 0
        for t in operands
    ) and _library_for(*operands) is not None


def gram(G: Tensor, center: Tensor | None = None, extra: Tensor | None = None) -> Tensor | None:
    """float64 Gram matrix of the rows of [G; extra], each minus center, by `distances.c`; None
    where it does not apply (`gram_applies`) and the caller uses torch's matmul.

    Columns go in fixed blocks of GRAM_BLOCK, up to torch.get_num_threads() at a time (the
    kernel runs without the GIL), summed in block order: the same bits for any thread count.
    """
    blocks = [G] if extra is None else [G, extra]
    if not gram_applies(*blocks, *([] if center is None else [center])):
        return None
    library = _library_for(G)
    rows = [t.data_ptr() + i * t.stride(0) * 4 for t in blocks for i in range(len(t))]  # float32
    m, d = len(rows), G.shape[1]
    row_pointers = (ctypes.c_void_p * m)(*rows)
    center_pointer = None if center is None else center.data_ptr()
    starts = range(0, d, GRAM_BLOCK)
    parts = torch.zeros(len(starts), m, m, dtype=torch.float64)

    def work(first: int, step: int) -> None:
        for i in range(first, len(starts), step):
            k0, k1 = starts[i], min(d, starts[i] + GRAM_BLOCK)
            library.squall_gram(row_pointers, m, k0, k1, center_pointer, parts[i].data_ptr())

    threads = min(torch.get_num_threads(), len(starts))
    if threads == 1:
        work(0, 1)
    else:
        global _threads
        if _threads is None:
            _threads = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="squall-gram")
        list(_threads.map(work, range(threads), [threads] * threads))
    K = parts[0].clone()
    for part in parts[1:]:
        K += part
    return K


def _library_for(*tensors: Tensor) -> ctypes.CDLL | None:
    """The distance kernels, when compiling is on and the tensors are on the CPU."""
    if _compiling() and all(t.device.type == "cpu" for t in tensors):
        return _c_library()
    return None


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build(_C_SOURCE)))
    except Exception as error:  # reported once per process, torch stays
        _report("the distance kernels", "torch", error)
        return None
    pointer, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    signatures = {  # name: (argument types, return type), as declared in distances.c
        "squall_gram": ([pointer, i32, i64, i64, pointer, pointer], None),
        "squall_bulyan_select": ([pointer, i32, i32, i32, pointer], i32),
        "squall_weiszfeld": ([pointer, i32, f64, f64, i32, f64, pointer], i32),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def bulyan_select(D: Tensor, f: int, theta: int) -> Tensor | None:
    """Bulyan's theta Krum rounds on the squared distances D by `distances.c` (the rule of
    `aggregators._bulyan_select`); None where it does not apply (compiling off or failed, D
    not on the CPU)."""
    if (library := _library_for(D)) is None:
        return None
    D = D.to(torch.float64).contiguous()
    picked = torch.empty(theta, dtype=torch.int64)
    failed = library.squall_bulyan_select(D.data_ptr(), D.shape[0], f, theta, picked.data_ptr())
    return None if failed else picked


def weiszfeld(
    K: Tensor, nu: float, tol: float, max_iter: int, tiny: float
) -> tuple[Tensor, int] | None:
    """`aggregators._weiszfeld` by `distances.c`: (beta, iterations run), or None where it
    does not apply (compiling off or failed, K not on the CPU)."""
    if (library := _library_for(K)) is None:
        return None
    K = K.to(torch.float64).contiguous()
    beta = torch.empty(K.shape[0] - 1, dtype=torch.float64)
    it = library.squall_weiszfeld(
        K.data_ptr(), K.shape[0] - 1, nu, tol, max_iter, tiny, beta.data_ptr()
    )
    return None if it < 0 else (beta, it)


def _cpu_features() -> str:
    """The CPU's model and instruction-set flags (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")
    seen = {line.split(":")[0].strip(): line for line in lines if line.startswith(wanted)}
    return "\n".join(sorted(seen.values())) or f"{platform.machine()} {platform.processor()}"


def _build(source: Path) -> Path:
    """Compile a C file into a shared library, once per machine: cached in the temp directory
    under a hash of the source, compiler, flags and CPU (-march=native code must not reach
    another CPU through a copied temp directory), written under a temporary name and
    renamed, so concurrent processes never load a half-written file."""
    compiler = os.environ.get("CC", "cc")
    code = source.read_bytes() + _cpu_features().encode()
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "user"
    cache = Path(tempfile.gettempdir()) / f"squall_{user}"
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):  # not every compiler has -march=native
        key = hashlib.sha256(b"\0".join([code, compiler.encode(), *map(str.encode, flags)]))
        target = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        command = [compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(source)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            os.replace(partial, target)
            return target
        partial.unlink(missing_ok=True)
        lines = result.stderr.splitlines()
        said = next((line for line in lines if "error" in line), lines[-1] if lines else "")
        said = said.strip() or f"exit status {result.returncode}"
        errors.append(f"{compiler} {' '.join(flags)}: {said}")
    raise RuntimeError("; ".join(errors))


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
    lo, hi = Y[(m - 1) // 2], Y[m // 2]
    median = lo + (hi - lo) * 0.5  # hi - lo is exact for close values: one rounding at most
    total = None
    for below, above in zip(Y[: m - beta], Y[beta:]):
        # below is at least as close as above iff median - below <= above - median (each
        # difference exact for values within 2x of the median; below + above >= 2 median
        # rounds the sum and, on a large common offset, kept farther values); clamp(t,
        # below, above) keeps below for t = -inf and above for t = +inf (on CPU ~15x faster
        # than torch.where on a bool mask)
        t = ((median - below <= above - median).to(below.dtype) - 0.5) * -INF
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
