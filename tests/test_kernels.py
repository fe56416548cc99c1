"""The compiled order-statistic kernels (strategies/kernels.py) against the references of
test_aggregators.py and the eager rules: the same answers to the bit, including ties and
infinities, NaN left to the eager path, and never a compile on the caller's thread."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_aggregators import close, np64, rand, ref_bulyan, ref_median, ref_trimmed_mean

from strategies import kernels
from strategies.rules.bulyan import bulyan
from strategies.rules.median import median
from strategies.rules.trimmed_mean import trimmed_mean

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not hasattr(torch.compiler, "set_stance"),
    reason="torch.compile needs a C++ compiler and torch >= 2.6",
)

N, F = 11, 2  # Bulyan's smallest n for f = 2: theta = 7, beta = 3
RULES = {
    "median": (lambda G: median(G, F), ref_median),
    "trimmed_mean": (lambda G: trimmed_mean(G, F), lambda X: ref_trimmed_mean(X, F)),
    "bulyan": (lambda G: bulyan(G, F), lambda X: ref_bulyan(X, F)),
}


@pytest.fixture(scope="module")
def compiled():
    """The three kernels for (N, F), compiled once for the module; yields whether torch's
    global random state is as it was before (compiling must not draw from it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUALL_COMPILE", "1")
        G = rand(N, 300, seed=0)
        rng = torch.get_rng_state()
        for rule, _ in RULES.values():
            rule(G)  # the first call queues the compile and answers eagerly
        kernels.wait()
        yield torch.equal(torch.get_rng_state(), rng)


KERNELS = {
    "median": [("median", N)],
    "bulyan": [("bulyan", N, F)],
    "trimmed_mean": [("trimmed_mean", N, F)],
}


def ready(name: str) -> bool:
    return all((*key, torch.float32) in kernels._ready for key in KERNELS[name])


@pytest.mark.parametrize("name", RULES)
def test_compiled_kernels_match_the_references(name, compiled, monkeypatch):
    assert ready(name)
    rule, ref = RULES[name]
    answers = []  # of the kernels: None where one fell back to the eager path
    run = kernels.run
    monkeypatch.setattr(kernels, "run", lambda *args: answers.append(run(*args)) or answers[-1])
    ties = torch.randint(-3, 4, (N, 500), generator=torch.Generator().manual_seed(1)).float()
    for G in [rand(N, 1000 + seed, seed) for seed in range(3)] + [ties]:  # other widths
        fused = rule(G)
        close(fused, ref(np64(G)))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SQUALL_COMPILE", "0")
            assert torch.equal(fused, rule(G))  # same operations in the same order
    assert answers and all(a is not None for a in answers)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_compiled_kernels_take_infinities_and_leave_nan_to_the_eager_path(name, compiled):
    rule, ref = RULES[name]
    G = rand(N, 400, seed=3)
    G[:3, :100] = float("inf")  # more than f: kept
    G[3, 100:200] = -float("inf")  # at most f: dropped by the trimmed mean
    close(rule(G), ref(np64(G)))
    G[5, 300:] = float("nan")  # NaN counts as +inf: only the eager path maps it
    inf = float("inf")
    close(rule(G), ref(np64(G.nan_to_num(nan=inf, posinf=inf, neginf=-inf))))


def test_an_input_the_kernel_was_not_compiled_for_gets_the_eager_answer(compiled):
    compiled_median = kernels._ready[("median", N, torch.float32)]
    G = rand(N, 1, seed=4)  # width 1: torch would specialise and recompile
    assert kernels.run(compiled_median, G) is None
    close(median(G), ref_median(np64(G)))
    assert kernels.run(compiled_median, rand(N, 50, seed=5)) is not None
    with torch.no_grad():  # compiled with it; torch guards the grad mode
        assert kernels.run(compiled_median, rand(N, 50, seed=5)) is not None


def test_compiling_leaves_the_global_random_state_alone(compiled):
    assert compiled  # a run's draws do not depend on when a kernel got compiled


def test_a_failed_compile_is_reported_once_and_leaves_the_rule_eager(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", False)

    def broken(G):
        raise RuntimeError("no compiler here")

    example = lambda: (torch.zeros(2, 8),)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="strategies.kernels"):
        for key in ("broken-1", "broken-2"):
            assert kernels.kernel(key, broken, example) is None
        kernels.wait()
    assert kernels.kernel("broken-1", broken, example) is None  # not retried, not ready
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "no compiler here" in failures[0].getMessage()


def test_kernels_stay_off_when_disabled_or_off_cpu(monkeypatch):
    G = torch.zeros(3, 4)
    monkeypatch.setenv("SQUALL_COMPILE", "0")
    assert not kernels.enabled(G)
    monkeypatch.setenv("SQUALL_COMPILE", "1")
    assert kernels.enabled(G) and not kernels.enabled(G.half())
    assert not kernels.enabled(torch.zeros(3, 4, device="meta"))


ROOT = Path(__file__).resolve().parents[1]

# The compile helper thread is still at work when the script ends: it must not abort the
# interpreter's exit (exit 134, "terminate called without an active exception", or a crash).
BUSY_AT_EXIT = """
import sys, threading, time, torch
from strategies import kernels
from strategies.rules.median import median
G = torch.randn(11, 5000, generator=torch.Generator().manual_seed(0))
if sys.argv[1] == "torch":  # deterministic: the helper is inside torch's C++ code (no GIL)
    A, started = torch.randn(1500, 1500), threading.Event()
    def busy():
        started.set()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            A @ A
    kernels._submit(busy)
    started.wait()
else:  # the real thing: the median's kernel is compiling, for that many seconds so far
    median(G, 2)
    time.sleep(float(sys.argv[1]))
print("answer", float(median(G, 2).sum()))
"""


def exit_while_busy(phase: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUSY_AT_EXIT, phase], cwd=ROOT, timeout=240,
                          capture_output=True, text=True, env={**os.environ, "SQUALL_COMPILE": "1"})


def test_exit_while_the_helper_runs_torch_code_is_clean():
    """A daemon thread inside torch's C++ code when the interpreter finalizes is ended by
    pthread_exit, whose unwind through torch's noexcept frames calls std::terminate: the
    helper is joined at exit instead (it finishes what it does)."""
    for _ in range(3):
        proc = exit_while_busy("torch")
        assert (proc.returncode, proc.stdout.split()[:1]) == (0, ["answer"]), proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr


def test_processes_ending_while_a_kernel_compiles_exit_cleanly():
    """The report: 2 in 7 short processes that used the compiled rules aborted at exit after
    their output. Five processes end at different points of the median's compile (torch
    caches compiled kernels on disk: only the first compiles from scratch)."""
    for delay in ("0", "0.75", "1.5", "2.25", "3"):
        proc = exit_while_busy(delay)
        said = proc.stderr[-2000:]
        assert proc.returncode == 0, f"exit {proc.returncode} after {delay} s: {said}"
        assert proc.stdout.startswith("answer") and "failed" not in proc.stderr
