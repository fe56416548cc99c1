"""squall report: PNG plots and an index.html for a run directory or a sweep directory.

A run (metrics.jsonl + summary.json): loss and test accuracy vs step and vs wall time, live
workers over time with preemption marks, cumulative cost vs on demand, bytes sent. A sweep
(sweep.csv): test accuracy, cost and wall time vs workers (one line per other setting), and a
report for each of its runs.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.config import ConfigError  # noqa: E402
from orchestrator.metrics import format_value, read_metrics  # noqa: E402
from orchestrator.sweep import read_sweep  # noqa: E402


def report(path: str | Path) -> Path:
    """Write the plots and index.html into the directory; returns the index.html path."""
    folder = Path(path)
    if (folder / "sweep.csv").exists():
        return sweep_report(folder)
    if (folder / "metrics.jsonl").exists():
        return run_report(folder)
    raise ConfigError(f"squall report {path}: not a run directory (metrics.jsonl) or a sweep "
                      "directory (sweep.csv)")


# --------------------------------------------------------------------------- one run
def run_report(folder: Path) -> Path:
    rows = read_metrics(folder)
    if not rows:
        raise ConfigError(f"squall report {folder}: metrics.jsonl has no steps yet")
    steps = [r["step"] for r in rows]
    wall = _wall(rows)
    metric = "test_acc" if any("test_acc" in r for r in rows) else "test_loss"
    evals = [r for r in rows if metric in r]
    images = []

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, x, label in ((a, steps, "step"), (b, wall, "wall time (s)")):
        ax.plot(x, [r["loss"] for r in rows], lw=1)
        ax.set(xlabel=label, ylabel="training loss", yscale="log")
    images.append(_save(fig, folder / "loss.png", "Training loss vs step and vs wall time"))

    if evals:
        eval_wall = [w for r, w in zip(rows, wall) if metric in r]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, x, label in ((a, [r["step"] for r in evals], "step"), (b, eval_wall,
                                                                        "wall time (s)")):
            ax.plot(x, [r[metric] for r in evals], marker="o", ms=3)
            ax.set(xlabel=label, ylabel=metric.replace("_", " "))
        images.append(_save(fig, folder / "accuracy.png",
                            f"{metric.replace('_', ' ').capitalize()} vs step and vs wall time"))

    live = [r["live_workers"] for r in rows]
    drops = [i for i in range(1, len(live)) if live[i] < live[i - 1]]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.step(wall, live, where="post", lw=1, label="live workers")
    ax.plot([wall[i] for i in drops], [live[i] for i in drops], "rx", label="preemption")
    ax.set(xlabel="wall time (s)", ylabel="live workers", ylim=(-0.2, max(live) + 0.5))
    ax.legend(loc="lower left")
    images.append(_save(fig, folder / "workers.png", "Live workers over time (x: a drop)"))

    if "cost_usd" in rows[0]:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.plot(wall, [r["cost_usd"] for r in rows], label="spot (this run)")
        ax.plot(wall, [r["on_demand_cost_usd"] for r in rows], "--", label="on demand")
        ax.set(xlabel="wall time (s)", ylabel="cumulative cost ($)")
        ax.legend()
        images.append(_save(fig, folder / "cost.png", "Cumulative cost vs on demand"))

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(steps, [r["bytes_sent"] / 1e6 for r in rows])
    ax.set(xlabel="step", ylabel="MB sent (cumulative)")
    images.append(_save(fig, folder / "bytes.png", "Bytes sent"))

    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    table = "<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(format_value(v))}</td></tr>"
        for k, v in summary.items()) + "</table>"
    return _index(folder, f"Run {folder.name}", table, images)


def _wall(rows: list[dict]) -> list[float]:
    """Wall seconds of each step (older runs without a time stamp: the sum of step times)."""
    if "wall_s" in rows[0]:
        return [r["wall_s"] for r in rows]
    total, out = 0.0, []
    for r in rows:
        total += r["step_s"]
        out.append(total)
    return out


# --------------------------------------------------------------------------- a sweep
def sweep_report(folder: Path) -> Path:
    rows = read_sweep(folder)
    if not rows:
        raise ConfigError(f"squall report {folder}: sweep.csv has no runs yet")
    for r in rows:
        if (folder / r["run"] / "metrics.jsonl").exists():
            run_report(folder / r["run"])
    settings = [dict(o.split("=", 1) for o in r["overrides"].split()) for r in rows]
    keys = list(settings[0])
    x_key = "workers" if "workers" in keys else (keys[0] if keys else "")
    x = _positions([s.get(x_key, "") for s in settings])
    images = []
    for column, label in (("test_acc", "test accuracy"), ("cost_usd", "cost ($)"),
                          ("wall_s", "wall time (s)")):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r, s, xi in zip(rows, settings, x):
            rest = " ".join(f"{k}={v}" for k, v in s.items() if k != x_key)
            lines[rest].append((xi, float(r[column])))
        fig, ax = plt.subplots(figsize=(7, 4))
        for rest, points in lines.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=rest or column)
        if column == "cost_usd":
            ax.plot(*zip(*sorted((xi, float(r["on_demand_cost_usd"]))
                                 for r, xi in zip(rows, x))), "k:", lw=0.8, label="on demand")
        ax.set(xlabel=x_key or "run", ylabel=label)
        ax.legend(fontsize=7)
        images.append(_save(fig, folder / f"sweep_{column}.png", f"{label} vs {x_key}"))
    header = list(rows[0])
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
             "".join("<tr>" + "".join(
                 f"<td><a href='{html.escape(r['run'])}/index.html'>{html.escape(r[h])}</a></td>"
                 if h == "run" and (folder / r["run"] / "index.html").exists()
                 else f"<td>{html.escape(r[h])}</td>" for h in header) + "</tr>" for r in rows)
             + "</table>")
    return _index(folder, f"Sweep {folder.name}", table, images)


def _positions(values: list[str]) -> list[float]:
    """Numeric values as numbers; otherwise each distinct value's position (0, 1, ...)."""
    try:
        return [float(v) for v in values]
    except ValueError:
        order = list(dict.fromkeys(values))
        return [float(order.index(v)) for v in values]


# --------------------------------------------------------------------------- files
def _save(fig: plt.Figure, path: Path, title: str) -> tuple[str, str]:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name, title


def _index(folder: Path, title: str, table: str, images: list[tuple[str, str]]) -> Path:
    figures = "".join(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                      for name, caption in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
            "img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{table}{figures}</body></html>\n")
    path = folder / "index.html"
    path.write_text(page)
    return path
