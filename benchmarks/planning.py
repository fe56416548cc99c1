"""The planner checked against real runs: `squall plan ... --check`, written into docs/planning.md.

    python -m benchmarks.planning              # about 4 min on 2 idle cores

Runs the command below in a fresh process (its own local Ray), then writes what it printed
and the files it wrote (the calibration line, `plan.md`, the recommendation, `check.md` with
its three verdicts) between the `<!-- generated -->` markers of docs/planning.md. Nothing in
the block is typed by hand; the dated reading notes after it are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.md_parts import write_generated  # noqa: E402

MD = ROOT / "docs" / "planning.md"
TITLE = "Planning: sweeps, the planner, and run reports"
COMMAND = ["plan", "workers=1,2,4", "steps=300", "cloud.preempt_prob=0.003", "model=mlp",
           "deadline=90", "--check"]


def run_check(out: Path, name: str) -> tuple[str, float]:
    """The command's stdout, and its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", *COMMAND, f"run.name={name}",
                           f"run.dir={out}", "log.progress=false"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the command failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - started


def printed(stdout: str, prefixes: tuple[str, ...]) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefixes)]


def report(stdout: str, run_dir: Path, took_s: float, load: tuple[float, float]) -> str:
    calibration = printed(stdout, ("calibration:",))
    recommended = printed(stdout, ("recommended (", "  squall train"))
    plan = (run_dir / "plan.md").read_text().strip()
    check = (run_dir / "check.md").read_text().strip()
    return "\n".join([
        f"Command: `squall {' '.join(COMMAND)}`, run by `python -m benchmarks.planning`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {took_s / 60:.1f} min for the whole "
        f"command  ",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end", "",
        "What it printed:", "", "```", *calibration, plan, *recommended, "```", "",
        "and the check (`check.md`):", "", check])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print-only", action="store_true", help="print; leave docs/ alone")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="squall-planning-") as tmp:
        stdout, took_s = run_check(Path(tmp), "plan")
        text = report(stdout, Path(tmp) / "plan", took_s, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.print_only:
        write_generated(MD, TITLE, text)
        print(f"wrote {MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
