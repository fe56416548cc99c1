"""run.restarts: the driver runs under a small supervisor that relaunches it when it dies.

The supervisor starts `squall train` with the same overrides as a child process (in a
session of its own, so that a terminal's Ctrl-C reaches it once, through the supervisor)
and waits. A child that ends with success, a user error (2) or a stop signal (129, 130, 143)
ends the supervisor with the same status; any other end (an exception, SIGKILL, the kernel's
OOM killer) relaunches it, up to run.restarts times. Every relaunch is the same run.name, so
it resumes from the run's newest checkpoint and counts the steps it redoes in lost_steps.
The supervisor imports neither Ray nor torch; a signal it receives goes to the child, which
stops as it would alone (checkpoint, summary, machines given back), and no relaunch follows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from orchestrator.config import Config
from orchestrator.metrics import make_run_dir

CHILD_ENV = "SQUALL_SUPERVISED"  # set in the child: it trains instead of supervising
FINAL = {0, 2, 129, 130, 143}  # done, a user error, stopped by a signal: never relaunched
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervised_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def supervise(cfg: Config, overrides: list[str]) -> int:
    """Run the job as a child `squall train`, relaunched after a crash; its exit status."""
    name = cfg.run.name or make_run_dir(cfg).name  # one run directory for every launch
    argv = [sys.executable, "-m", "orchestrator", "train", *overrides,
            *([] if cfg.run.name else [f"run.name={name}"])]
    stopping: list[int] = []
    for launch in range(cfg.run.restarts + 1):
        child = subprocess.Popen(argv, env={**os.environ, CHILD_ENV: "1"},
                                 start_new_session=True)
        previous = forward_signals(child, stopping)
        try:
            status = exit_status(child.wait())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if status in FINAL or stopping or launch == cfg.run.restarts:
            return status
        print(f"squall: the driver ended with {describe(status)}; relaunching it "
              f"({launch + 1} of run.restarts={cfg.run.restarts}): run {name} resumes from its "
              "newest checkpoint", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def forward_signals(child: subprocess.Popen, stopping: list[int]) -> dict:
    """Pass SIGINT, SIGTERM and SIGHUP on to the child and remember that the job is being
    stopped; returns the previous handlers."""

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    return {signum: signal.signal(signum, forward) for signum in FORWARDED}


def exit_status(returncode: int) -> int:
    """A shell's exit status: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(status: int) -> str:
    if status > 128:
        with_name = signal.Signals(status - 128).name if status - 128 in signal.valid_signals() \
            else f"signal {status - 128}"
        return f"{with_name} (exit {status})"
    return f"exit {status}"
