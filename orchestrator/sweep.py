"""squall sweep: the cross product of comma-separated overrides, one training run after the other.

    squall sweep workers=2,4,8 cloud=simulated cloud.preempt_prob=0,0.05,0.1 steps=200

Each run gets its own run directory, runs/<sweep>/<key=value+key=value>, and the sweep directory
gets sweep.csv and sweep.md, rewritten after every run. Every combination is validated before
the first run starts. Ctrl-C stops the sweep after the current run (which stops cleanly, as
`squall train` does) and keeps what is done; running the same sweep again skips finished runs.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

from cloud.pool import watch_local_ray
from orchestrator.config import Config, ConfigError, load_config
from orchestrator.metrics import format_table, format_value
from orchestrator.preflight import preflight

COLUMNS = ["run", "overrides", "test_acc", "steps_done", "wall_s", "cost_usd",
           "on_demand_cost_usd", "preemptions", "live_workers_mean", "interrupted", "error"]


def split_values(text: str) -> tuple[str, list[str]]:
    """'workers=2,4' -> ('workers', ['2', '4']); a bracketed or quoted value stays whole."""
    key, sep, raw = text.partition("=")
    if not sep or "," not in raw or raw.strip()[:1] in ("[", "{", "'", '"'):
        return key, [raw]
    values = [v.strip() for v in raw.split(",")]
    if not all(values):
        raise ConfigError(f"'{text}': empty value in the comma-separated list")
    return key, values


def combinations(args: list[str]) -> tuple[list[str], list[list[str]]]:
    """The swept keys and, per run, its overrides (fixed ones first, swept ones last)."""
    fixed, swept = [], []
    for text in args:
        key, values = split_values(text)
        if len(values) > 1:
            swept.append([f"{key}={v}" for v in values])
        else:
            fixed.append(text)
    keys = [group[0].partition("=")[0] for group in swept]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a key is swept twice: {', '.join(keys)}")
    return keys, [fixed + list(combo) for combo in itertools.product(*swept)]


def run_name(overrides: list[str], keys: list[str]) -> str:
    """The swept part of a run's overrides, as a directory name."""
    swept = [o for o in overrides if o.partition("=")[0] in keys]
    return "+".join(swept).replace("/", "_") or "run"


def plan_sweep(args: list[str]) -> tuple[Path, list[str], list[tuple[str, str, Config]]]:
    """Validate every combination (ConfigError on the first bad one) before anything runs.
    Returns the sweep directory, the swept keys and (name, swept overrides, config) per run."""
    keys, combos = combinations(args)
    checked = []
    for overrides in combos:
        swept = " ".join(o for o in overrides if o.partition("=")[0] in keys)
        try:
            checked.append((overrides, swept, load_config(overrides)))
        except ConfigError as e:
            raise ConfigError(f"sweep run {swept}: {e}") from None
    first = checked[0][2]
    sweep = first.run.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    folder = Path(first.run.dir).expanduser() / sweep
    runs = []
    for overrides, swept, cfg in checked:
        name = run_name(overrides, keys)
        cfg.run.name = f"{sweep}/{name}"
        try:
            preflight(cfg)  # paths the run will write, before anything runs
        except ConfigError as e:
            raise ConfigError(f"sweep run {swept}: {e}") from None
        runs.append((name, swept, cfg))
    return folder, keys, runs


def run_sweep(args: list[str]) -> int:
    """squall sweep: run every combination in turn; exit status 130 when stopped by Ctrl-C."""
    folder, keys, runs = plan_sweep(args)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"squall: sweep of {len(runs)} runs over {', '.join(keys) or 'nothing'} in {folder}")
    rows: list[dict] = []
    todo = [cfg for name, _, cfg in runs if finished_summary(folder / name, cfg) is None]
    shared = len(todo) > 1 and share_local_ray(todo)
    try:
        stopped = _run_all(folder, runs, rows)
    finally:
        if shared:
            import ray

            ray.shutdown()
    if stopped:
        print(f"squall: sweep stopped after {len(rows)} of {len(runs)} runs; run the same "
              "command again to continue")
        return 130
    print(format_table(COLUMNS[:-2], [[r[c] for c in COLUMNS[:-2]] for r in rows]))
    print(f"squall: wrote {folder / 'sweep.csv'} and {folder / 'sweep.md'}")
    return 0


def share_local_ray(configs: list[Config]) -> bool:
    """When every run would start its own local Ray (cloud=local, no address), start one for
    all of them instead, sized for the largest (Ray's start-up is paid once). Returns whether
    it did; the runs then leave it running (a pool shuts down only a Ray it started)."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or any(
            c.cloud.name != "local" or c.ray.address for c in configs):
        return False
    cpus = max(c.ray.num_cpus or max(os.cpu_count() or 1,
                                     math.ceil(c.workers * c.worker.num_cpus)) for c in configs)
    ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING,
             include_dashboard=any(c.ray.dashboard for c in configs))
    watch_local_ray()  # a killed sweep leaves no Ray process behind (it ends with the sweep)
    return True


def _run_all(folder: Path, runs: list[tuple[str, str, Config]], rows: list[dict]) -> bool:
    """Run (or skip, when finished) each run in turn, appending to rows and rewriting the
    tables. Returns True when Ctrl-C stopped the sweep."""
    for i, (name, swept, cfg) in enumerate(runs, 1):
        summary = finished_summary(folder / name, cfg)
        if summary is None:
            print(f"squall: sweep run {i}/{len(runs)}: {name}")
            try:
                from orchestrator.run import train  # imports Ray and torch

                summary = train(cfg)
            except KeyboardInterrupt:  # between runs: nothing of this run to keep
                return True
        rows.append({"run": name, "overrides": swept,
                     **{c: format_value(summary.get(c, math.nan)) for c in COLUMNS[2:]}})
        write_tables(folder, rows)
        if summary["interrupted"]:
            return True
    return False


def finished_summary(run_dir: Path, cfg: Config) -> dict | None:
    """The summary of a run of this sweep that already finished all its steps, if any."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    done = summary["steps_done"] == cfg.steps and not summary["interrupted"]
    return summary if done and not summary["error"] else None


def write_tables(folder: Path, rows: list[dict]) -> None:
    with open(folder / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = format_table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    (folder / "sweep.md").write_text(f"# Sweep {folder.name}\n\n{table}\n")


def read_sweep(folder: Path) -> list[dict]:
    """The rows of sweep.csv."""
    with open(folder / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))
