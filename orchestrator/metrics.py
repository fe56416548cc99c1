"""The run directory: config.yaml, metrics.jsonl (one line per step), summary.json, and what
the user sees: a progress bar on stderr and a short report at the end. With
log.tensorboard=true every numeric field of each step also goes to <run dir>/tensorboard."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from orchestrator.config import Config, ConfigError, to_yaml

BARS = " ▁▂▃▄▅▆▇█"


def make_run_dir(cfg: Config) -> Path:
    """runs/<run.name>, absolute; without a name, a timestamp (suffixed -2, -3... if taken)."""
    parent = Path(cfg.run.dir).expanduser().absolute()
    if cfg.run.name:
        return parent / cfg.run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = parent / stamp, 1
    while path.exists():
        i += 1
        path = parent / f"{stamp}-{i}"
    return path


def sparkline(values: list[int], top: int, width: int = 60) -> str:
    """Values (0..top) averaged into at most `width` buckets, one block character each."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    return "".join(BARS[round(sum(b) / len(b) / max(top, 1) * (len(BARS) - 1))] for b in buckets)


def format_value(value: object) -> str:
    """A table cell: floats to 6 significant digits."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (none when it does not exist yet). A last line cut
    short (the machine died mid-write, the disk filled) is left out: its step is redone."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # damage inside the file is not a crash mid-write
                raise
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (readable as plain text too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


REDONE = "redone.json"  # steps redone by the resumes of a run, so far


class RunLog:
    """Writes a run's files and shows its progress on stderr."""

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.dir = run_dir or make_run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self._tensorboard = None
        self._bar: tqdm | None = None
        self._bar_start = 0
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.tensorboard=true needs the tensorboard package: "
                                  "pip install 'squall[tensorboard]'") from None
            self._tensorboard = SummaryWriter(str(self.dir / "tensorboard"))

    def open_metrics(self, start_step: int) -> int:
        """Start logging after `start_step`: lines past it (steps a resumed run redoes) are
        dropped. Returns how many steps the run has redone in all its resumes, counted in
        the run directory (redone.json, written before any step is redone), since a crash
        before the next checkpoint would lose a count kept only in the checkpoint."""
        path = self.dir / "metrics.jsonl"
        rows = read_metrics(self.dir)  # steps past the checkpoint (all, without one) are redone
        kept = [r for r in rows if r["step"] <= start_step]
        redone = max(0, max([r["step"] for r in rows], default=start_step) - start_step)
        total = self._redone_before() + redone
        if redone:
            tmp = self.dir / ".redone.json.tmp"
            tmp.write_text(json.dumps({"steps": total}))
            os.replace(tmp, self.dir / REDONE)
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(path, "a")
        self._bar_start = start_step
        return total

    def _redone_before(self) -> int:
        try:
            return int(json.loads((self.dir / REDONE).read_text())["steps"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def step(self, record: dict, evaluated: dict | None = None) -> None:
        """Write the step's record; `evaluated`: the metrics of an evaluation in this step
        (also in the record), printed on a line of their own."""
        if self._bar is None:  # shown from the first step: start-up errors come out clean
            self._bar = tqdm(total=self.cfg.steps, initial=self._bar_start, file=sys.stderr,
                             disable=not self.cfg.log.progress, desc="train", unit="step",
                             dynamic_ncols=True)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])
        postfix = {"loss": f"{record['loss']:.3f}", "workers": record["live_workers"]}
        if evaluated:
            postfix.update({k: f"{v:.3f}" for k, v in list(evaluated.items())[:1]})
            self._bar.write(f"step {record['step']} | loss {record['loss']:.4f} | "
                            f"{shown_metrics(evaluated)} | "
                            f"{record['live_workers']} workers | {record['step_s']:.3f} s",
                            file=sys.stderr)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def finish(self, summary: dict, live: list[int], evaluated: dict) -> None:
        """Write summary.json and print the summary; `evaluated`: the final metrics."""
        if self._bar is not None:
            self._bar.close()
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        s = summary
        status = "interrupted" if s["interrupted"] else "done"
        lines = [f"squall: run {self.dir} {status} in {s['wall_s']:.1f} s",
                 f"  steps {s['steps_done']}/{self.cfg.steps} | {shown_metrics(evaluated)} | "
                 f"loss {s['loss']:.4f} | sent {s['bytes_sent'] / 1e6:.1f} MB | "
                 f"skipped steps {s['skipped_steps']}",
                 f"  live workers {s['live_workers_mean']:.2f} mean of {self.cfg.workers} "
                 f"|{sparkline(live, self.cfg.workers)}|",
                 f"  preemptions {s['preemptions']} | joins {s['joins']} | "
                 f"steps redone {s['lost_steps']}"]
        if s["on_demand_cost_usd"] > 0:
            saved = 1 - s["cost_usd"] / s["on_demand_cost_usd"]
            lines.append(f"  cost ${s['cost_usd']:.4f} vs ${s['on_demand_cost_usd']:.4f} on "
                         f"demand ({saved:.0%} saved)")
        print("\n".join(lines))


def shown_metrics(metrics: dict) -> str:
    """'test_acc 0.9528 | bits_per_char 2.1' (or 'no evaluation')."""
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no evaluation"
