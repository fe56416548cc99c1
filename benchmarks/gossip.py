"""Gossip benchmark: D-PSGD vs Moniqua 1/2/4 bits vs CHOCO vs a known-broken Moniqua, on
non-iid digits (2 classes per worker), ring of 8 and of 16 workers, several seeds.

    python -m benchmarks.gossip                      # full run: writes gossip.md and gossip.png
                                                     # (36 runs, about 40 min on 2 cores)
    python -m benchmarks.gossip --quick              # smoke run: prints, writes neither
    python -m benchmarks.gossip --steps 250 --seeds 0,1,2 --workers 8,16
    python -m benchmarks.gossip --render /tmp/gossip-runs.json   # md and png from saved runs

Every run goes through squall's own training job (orchestrator.run.train on a load_config
config), all in one local Ray session. Per (workers, method) it reports the final test
accuracy of the averaged model (median over seeds, min-max, each seed), its difference to
D-PSGD, the total bytes per worker per step (summary bytes_up + bytes_down: messages per
fetching neighbour, Moniqua's control codes and resync pulls) and the ratio to D-PSGD, the
consensus distance (final and over time, from each run's metrics.jsonl) and wall seconds;
then verdicts computed from those numbers. The generated block of benchmarks/gossip.md sits
between `<!-- generated -->` and `<!-- end generated -->`; everything else in the file (the
dated reading notes) is kept across reruns.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks.md_parts import write_generated  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402
from orchestrator.run import train  # noqa: E402

DEFAULT_STEPS, DEFAULT_SEEDS, DEFAULT_SIZES = 300, "0,1,2", "8,16"
MD = Path(__file__).with_suffix(".md")
PNG = Path(__file__).with_suffix(".png")
TITLE = "Gossip: D-PSGD vs Moniqua vs CHOCO on non-iid digits"

DPSGD, TWO_BITS, BROKEN = "D-PSGD (fp32)", "Moniqua 2 bits", "Moniqua 2 bits (before)"
METHODS: dict[str, list[str]] = {  # squall's defaults unless stated
    DPSGD: ["strategy.compress=none"],
    "Moniqua 4 bits": ["strategy.compress=moniqua", "strategy.bits=4"],
    TWO_BITS: ["strategy.compress=moniqua", "strategy.bits=2"],
    "Moniqua 1 bit": ["strategy.compress=moniqua", "strategy.bits=1"],
    "CHOCO (sign)": ["strategy.compress=choco"],
    # the settings before the fix: one theta, nearest rounding, gamma 1, margin 2
    BROKEN: ["strategy.compress=moniqua", "strategy.bits=2", "strategy.block_size=0",
             "strategy.rounding=nearest", "strategy.gamma=1", "strategy.theta_margin=2"],
}
COMMON = ["strategy=gossip", "strategy.topology=ring", "model=mlp", "optim.lr=0.1",
          "optim.momentum=0", "data.partition=classes_per_worker", "data.classes_per_worker=2",
          "log.progress=false", "eval.every=0", "strategy.consensus_every=10",
          "checkpoint.every_steps=0"]

# verdict thresholds (points are percentage points of test accuracy)
BROKEN_POINTS, BROKEN_CONSENSUS_X = 3.0, 10.0  # (b): below D-PSGD by this, or this x consensus
TWO_BITS_POINTS = 1.0  # (c)
TWO_BITS_BYTES_X = 14.0  # (d)


@dataclass
class Run:
    """What one training run measured."""

    workers: int
    method: str
    seed: int
    acc: float = float("nan")
    bytes_per_worker_step: float = float("nan")
    consensus: list[tuple[int, float]] = field(default_factory=list)  # (step, distance)
    wall_s: float = 0.0
    wraps: int = 0
    theta_breaches: int | None = None  # Moniqua's bound checks that failed (None: no theta)
    gamma: float = float("nan")
    load: float = float("nan")  # 1-minute load average when the run ended
    error: str = ""

    @property
    def final_consensus(self) -> float:
        return self.consensus[-1][1] if self.consensus else float("nan")


@dataclass
class Cell:
    """The runs of one (workers, method) over the seeds, and their statistics."""

    runs: list[Run]

    def values(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs]

    def median(self, attr: str) -> float:
        return statistics.median(self.values(attr))

    def spread(self, attr: str) -> tuple[float, float]:
        vals = self.values(attr)
        return min(vals), max(vals)

    def seed_range(self, attr: str) -> float:
        lo, hi = self.spread(attr)
        return hi - lo


# --------------------------------------------------------------------------- running
def run_name(workers: int, method: str, seed: int) -> str:
    return f"w{workers}-s{seed}-{re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')}"


def run_one(workers: int, method: str, seed: int, steps: int, tmp: str) -> Run:
    """One training run through squall's job; its summary and metrics.jsonl read back. A run
    that raises is kept as an error row (NaN numbers) so the others still report."""
    cfg = load_config([*COMMON, f"workers={workers}", f"steps={steps}", f"seed={seed}",
                       *METHODS[method], f"run.dir={tmp}",
                       f"run.name={run_name(workers, method, seed)}"])
    run = Run(workers, method, seed, gamma=cfg.strategy.gamma)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # train's end-of-run report
            summary = train(cfg)
    except Exception as e:  # noqa: BLE001 - reported in the table, the grid goes on
        run.error, run.wall_s = f"{type(e).__name__}: {e}", time.perf_counter() - t0
        return run
    run.wall_s = time.perf_counter() - t0
    run.load = os.getloadavg()[0]
    run.error = summary["error"] or ("interrupted" if summary["interrupted"] else "")
    worker_steps = summary["live_workers_mean"] * summary["steps_done"]
    run.bytes_per_worker_step = ((summary["bytes_up"] + summary["bytes_down"])
                                 / max(1.0, worker_steps))
    run.acc = float(summary.get("test_acc", float("nan")))
    run.wraps = int(summary.get("wraps", 0))
    run.theta_breaches = summary.get("theta_breaches")
    run.consensus = [(m["step"], m["consensus_dist"] if math.isfinite(m["consensus_dist"])
                      else math.inf)  # a diverged replica
                     for m in read_metrics(summary["run_dir"]) if "consensus_dist" in m]
    return run


def run_all(sizes: list[int], seeds: list[int], steps: int, raw: Path, cmd: str) -> list[Run]:
    """Every (workers, seed, method) in one local Ray session; the methods of a seed run back
    to back so that background load hits them alike. Each run is saved to `raw` as it ends
    (--render re-reads it)."""
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=max(sizes), include_dashboard=False,
             logging_level="warning")
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="squall-gossip-") as tmp:
            for workers in sizes:
                for seed in seeds:
                    for method in METHODS:
                        runs.append(run_one(workers, method, seed, steps, tmp))
                        save_runs(raw, cmd, steps, runs)
                        print(progress_line(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    return runs


def progress_line(r: Run) -> str:
    return (f"ring-{r.workers} seed {r.seed} {r.method}: acc {r.acc:.4f} consensus "
            f"{r.final_consensus:.3g} bytes/worker/step {r.bytes_per_worker_step:,.0f} wraps "
            f"{alarms(r)} {r.wall_s:.1f} s load {r.load:.1f} {r.error}")


def save_runs(path: Path, cmd: str, steps: int, runs: list[Run]) -> None:
    path.write_text(json.dumps({"command": cmd, "steps": steps,
                                "runs": [asdict(r) for r in runs]}) + "\n")


def load_runs(path: Path) -> tuple[str, int, list[Run]]:
    data = json.loads(path.read_text())
    runs = [Run(**{**r, "consensus": [tuple(p) for p in r["consensus"]]}) for r in data["runs"]]
    return data["command"], data["steps"], runs


def cells(runs: list[Run]) -> dict[int, dict[str, Cell]]:
    """Runs grouped by workers, then by method (METHODS order)."""
    out: dict[int, dict[str, Cell]] = {}
    for r in runs:
        out.setdefault(r.workers, {}).setdefault(r.method, Cell([])).runs.append(r)
    return out


# --------------------------------------------------------------------------- numbers
def pts(x: float) -> str:
    return f"{100 * x:.1f}"


def times(x: float) -> str:
    return f"{x:.1f}x" if math.isfinite(x) else "diverged"


def consensus_at(cell: Cell, step: int) -> float:
    """Median over the seeds of the consensus distance measured at `step`."""
    vals = [dict(r.consensus).get(step) for r in cell.runs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")


def checkpoints(steps: int) -> list[int]:
    """The steps shown in the consensus-over-time table (multiples of consensus_every)."""
    return sorted({max(10, round(steps * f / 10) * 10) for f in (0.04, 0.25, 0.5, 0.75)}
                  | {steps})


def alarms(run: Run) -> str:
    """'3 (12)': the run's wrap alarms and, for Moniqua, its theta breaches."""
    return str(run.wraps) if run.theta_breaches is None else f"{run.wraps} ({run.theta_breaches})"


def result_table(group: dict[str, Cell]) -> list[str]:
    base = group[DPSGD]
    acc0, bytes0 = base.median("acc"), base.median("bytes_per_worker_step")
    cons0 = base.median("final_consensus")
    lines = ["| method | gamma | test acc % median (min-max) | each seed | vs D-PSGD "
             "(points) | bytes/worker/step | fewer bytes | consensus final median (min-max) "
             "| vs D-PSGD | wraps (theta breaches) per seed | wall s median |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in group.items():
        lo, hi = c.spread("acc")
        clo, chi = c.spread("final_consensus")
        nbytes = c.median("bytes_per_worker_step")
        errors = sum(bool(r.error) for r in c.runs)
        lines.append(
            f"| {name}{f' ({errors} errors)' if errors else ''} | {c.runs[0].gamma:g} | "
            f"{pts(c.median('acc'))} ({pts(lo)}-{pts(hi)}) | "
            f"{', '.join(pts(v) for v in c.values('acc'))} | "
            f"{100 * (c.median('acc') - acc0):+.1f} | {nbytes:,.0f} | "
            f"{bytes0 / nbytes:.1f}x | {c.median('final_consensus'):.3g} "
            f"({clo:.3g}-{chi:.3g}) | {times(c.median('final_consensus') / cons0)} | "
            f"{', '.join(alarms(r) for r in c.runs)} | {c.median('wall_s'):.0f} |")
    return lines


def consensus_table(group: dict[str, Cell], steps: int) -> list[str]:
    marks = checkpoints(steps)
    lines = ["| method | " + " | ".join(f"step {s}" for s in marks) + " |",
             "|---|" + "---|" * len(marks)]
    for name, c in group.items():
        lines.append(f"| {name} | " + " | ".join(f"{consensus_at(c, s):.3g}" for s in marks)
                     + " |")
    return lines


# --------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    label: str
    passed: bool
    numbers: str


def separable(group: dict[str, Cell]) -> Verdict:
    base, broken = group[DPSGD], group[BROKEN]
    gap, range0 = base.median("acc") - broken.median("acc"), base.seed_range("acc")
    medians = [c.median("acc") for c in group.values()]
    widest = max(c.seed_range("acc") for c in group.values())
    return Verdict("(a) separable: the before variant's median is below D-PSGD's by more than "
                   "D-PSGD's seed range", gap > range0,
                   f"gap {100 * gap:.1f} points vs D-PSGD seed range {100 * range0:.1f}; all "
                   f"methods' medians span {100 * (max(medians) - min(medians)):.1f} points, "
                   f"the widest seed range of a method is {100 * widest:.1f}")


def broken_fails(group: dict[str, Cell]) -> Verdict:
    base, broken = group[DPSGD], group[BROKEN]
    gap = base.median("acc") - broken.median("acc")
    cons_x = broken.median("final_consensus") / base.median("final_consensus")
    by_acc, by_cons = gap >= BROKEN_POINTS / 100, cons_x >= BROKEN_CONSENSUS_X
    return Verdict(f"(b) broken variant fails: >= {BROKEN_POINTS:g} points below D-PSGD or "
                   f">= {BROKEN_CONSENSUS_X:g}x its final consensus distance (medians)",
                   by_acc or by_cons,
                   f"{100 * gap:.1f} points below ({'meets' if by_acc else 'misses'} the "
                   f"accuracy bar); consensus {times(cons_x)} "
                   f"({'meets' if by_cons else 'misses'} the consensus bar)")


def two_bits_close(group: dict[str, Cell]) -> Verdict:
    acc0, two = group[DPSGD].median("acc"), group[TWO_BITS]
    gap = two.median("acc") - acc0
    return Verdict(f"(c) Moniqua 2 bits within {TWO_BITS_POINTS:g} point of D-PSGD (medians)",
                   abs(gap) <= TWO_BITS_POINTS / 100,
                   f"{100 * gap:+.1f} points; per seed against D-PSGD's median "
                   f"{', '.join(f'{100 * (v - acc0):+.1f}' for v in two.values('acc'))}")


def two_bits_bytes(group: dict[str, Cell]) -> Verdict:
    bytes0 = group[DPSGD].median("bytes_per_worker_step")
    two = group[TWO_BITS]
    ratio = bytes0 / two.median("bytes_per_worker_step")
    each = ", ".join(f"{bytes0 / v:.1f}" for v in two.values("bytes_per_worker_step"))
    return Verdict(f"(d) Moniqua 2 bits >= {TWO_BITS_BYTES_X:g}x fewer total bytes than fp32",
                   ratio >= TWO_BITS_BYTES_X,
                   f"{ratio:.1f}x (per seed {each}); bytes_up + bytes_down per worker per step")


def verdicts(group: dict[str, Cell]) -> list[Verdict]:
    """(a)-(d), each computed from the measured numbers of one ring size."""
    return [check(group) for check in (separable, broken_fails, two_bits_close, two_bits_bytes)]


def easy_note(workers: int, found: list[Verdict]) -> list[str]:
    """A sentence when the data set does not separate the methods at this size."""
    if found[0].passed:
        return []
    return [f"**Digits does not separate the methods on ring-{workers}**: the before variant "
            "is not below D-PSGD by more than D-PSGD's own seed range, so accuracy alone "
            "cannot tell a broken method from a working one here (see the consensus "
            "distance).", ""]


# --------------------------------------------------------------------------- outputs
def plot(groups: dict[int, dict[str, Cell]], out: Path) -> None:
    """Consensus distance over steps (median over seeds, min-max shaded), one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (workers, group) in zip(axes[0], sorted(groups.items())):
        for name, c in group.items():
            steps = sorted({s for r in c.runs for s, _ in r.consensus})
            series = [[dict(r.consensus).get(s, float("nan")) for s in steps] for r in c.runs]
            per_step = [[v for v in col if v == v] for col in zip(*series)]
            ax.plot(steps, [statistics.median(v) if v else float("nan") for v in per_step],
                    label=name)
            ax.fill_between(steps, [min(v, default=float("nan")) for v in per_step],
                            [max(v, default=float("nan")) for v in per_step], alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"ring-{workers}, non-iid digits (2 classes/worker)")
        ax.set_xlabel("step")
        ax.set_ylabel("consensus distance mean ||x_i - x_bar||")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def header(cmd: str, steps: int, seeds: list[int], elapsed_s: float,
           runs: list[Run]) -> list[str]:
    loads = [r.load for r in runs if r.load == r.load]
    load = (f"1-min load average at the end of each run: median {statistics.median(loads):.1f}, "
            f"max {max(loads):.1f}" if loads else "load average not recorded")
    return [
        f"Produced {time.strftime('%Y-%m-%d')} by `{cmd}` from the repository root in "
        f"{elapsed_s / 60:.1f} min.", "",
        f"- machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, Ray {ray.__version__}; {load} (other jobs may share "
        "the cores: compare wall times within a table only; most of a run's wall time is "
        "starting its worker actors)",
        f"- digits, data.partition=classes_per_worker with 2 classes per worker (worker i holds "
        "classes 2i, 2i+1 mod 10), ring topology, mlp, "
        f"{steps} steps, batch 32 per worker, plain SGD lr 0.1, seeds "
        f"{', '.join(map(str, seeds))}; "
        "the accuracy is the averaged model's on the test split (360 images: one image is "
        "0.28 points), evaluated once at the end",
        "- bytes/worker/step: (summary bytes_up + bytes_down) / (workers x steps): each "
        "message once up and once per neighbour that fetches it, Moniqua's control codes "
        "(theta down, per-block stats up) and the replicas pulled for a resync; not the "
        "consensus measurement pulls (bytes_measure); median over seeds; fewer bytes = "
        "D-PSGD's / this",
        "- consensus distance: mean ||x_i - x_bar|| over the replicas, every 10 steps; final "
        "= last step, median over seeds (min-max); vs D-PSGD = ratio of medians",
        "- gamma: the consensus step size the run used (squall's default for the method unless "
        "set); wraps: Moniqua's wrap-around alarms per seed; theta breaches: the consensus "
        "measurements that found two neighbours further apart than theta (summary "
        "theta_breaches)",
        "- the before variant: 2 bits, one theta for the whole model (block_size=0), nearest "
        "rounding, gamma 1, theta margin 2 (Moniqua's settings before the fix; known broken)",
        f"- plot: {PNG.name} (consensus distance over steps, median over seeds, min-max shaded)",
        ""]


def report(groups: dict[int, dict[str, Cell]], steps: int) -> list[str]:
    lines = []
    for workers, group in sorted(groups.items()):
        found = verdicts(group)
        lines += [f"## Ring, {workers} workers", "", *result_table(group), "",
                  "Consensus distance over time (median over seeds):", "",
                  *consensus_table(group, steps), "", "Verdicts (computed from the tables):",
                  "", "| verdict | result | numbers |", "|---|---|---|",
                  *[f"| {v.label} | {'PASS' if v.passed else 'FAIL'} | {v.numbers} |"
                    for v in found], "", *easy_note(workers, found)]
    return lines


# --------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated")
    parser.add_argument("--workers", default=None,
                        help=f"ring sizes, comma-separated (default {DEFAULT_SIZES}; --quick 8)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 steps, seed 0, ring-8; prints, writes neither md "
                        "nor png")
    parser.add_argument("--render", type=Path, metavar="RUNS_JSON",
                        help="no runs: write md and png from the runs a full run saved")
    return parser.parse_args()


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (defaults left out)."""
    cmd = "python -m benchmarks.gossip" + (" --quick" if args.quick else "")
    for flag, value, default in (("--steps", str(args.steps), str(DEFAULT_STEPS)),
                                 ("--seeds", args.seeds, DEFAULT_SEEDS),
                                 ("--workers", args.workers, None)):
        cmd += "" if value == default else f" {flag} {value}"
    return cmd


def render(cmd: str, steps: int, runs: list[Run], elapsed_s: float) -> str:
    groups = cells(runs)
    seeds = sorted({r.seed for r in runs})
    return "\n".join([*header(cmd, steps, seeds, elapsed_s, runs), *report(groups, steps)])


def main() -> None:
    args = parse_args()
    if args.render:
        cmd, steps, runs = load_runs(args.render)
        elapsed = sum(r.wall_s for r in runs)
    else:
        steps = 20 if args.quick else args.steps
        seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
        sizes = [int(w) for w in (args.workers or ("8" if args.quick else DEFAULT_SIZES))
                 .split(",")]
        raw = Path(tempfile.gettempdir()) / f"gossip-{'quick-' if args.quick else ''}runs.json"
        t0, cmd = time.perf_counter(), command(args)
        runs = run_all(sizes, seeds, steps, raw, cmd)
        elapsed = time.perf_counter() - t0
        print(f"runs saved in {raw}")
    text = render(cmd, steps, runs, elapsed)
    if args.quick:
        png = Path(tempfile.gettempdir()) / "gossip-quick.png"
        plot(cells(runs), png)
        print(text, f"(--quick: {MD.name} not written; plot at {png}; {elapsed / 60:.1f} min)",
              sep="\n")
        return
    plot(cells(runs), PNG)
    write_generated(MD, TITLE, text)
    print(f"wrote {MD} and {PNG} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
