"""The run directory: config.yaml, metrics.jsonl (one line per step), summary.json, and the
progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from orchestrator.config import Config, to_yaml


def make_run_dir(cfg: Config) -> Path:
    """runs/<run.name>; without a name, a timestamp (suffixed -2, -3... if taken)."""
    parent = Path(cfg.run.dir).expanduser()
    if cfg.run.name:
        return parent / cfg.run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = parent / stamp, 1
    while path.exists():
        i += 1
        path = parent / f"{stamp}-{i}"
    return path


class RunLog:
    """Writes a run's files and shows its progress on stderr."""

    def __init__(self, cfg: Config) -> None:
        self.dir = make_run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self._metrics = open(self.dir / "metrics.jsonl", "w")
        self._bar = tqdm(total=cfg.steps, file=sys.stderr, disable=not cfg.log.progress,
                         desc="train", unit="step", dynamic_ncols=True)
        self._total = cfg.steps

    def step(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        postfix = {"loss": f"{record['loss']:.3f}", "workers": record["live_workers"]}
        if "test_acc" in record:
            postfix["acc"] = f"{record['test_acc']:.3f}"
            self._bar.write(f"step {record['step']} | loss {record['loss']:.4f} | "
                            f"test_acc {record['test_acc']:.4f} | "
                            f"{record['live_workers']} workers | {record['step_s']:.3f} s",
                            file=sys.stderr)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def finish(self, summary: dict) -> None:
        self._bar.close()
        self._metrics.close()
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        status = "interrupted" if summary["interrupted"] else "done"
        print(f"squall: run {self.dir} {status} in {summary['wall_s']:.1f} s\n"
              f"  steps {summary['steps_done']}/{self._total} | "
              f"test_acc {summary['test_acc']:.4f} | loss {summary['loss']:.4f} | "
              f"live workers {summary['live_workers_mean']:.2f} (mean) | "
              f"sent {summary['bytes_sent'] / 1e6:.1f} MB | cost ${summary['cost_usd']:.2f} | "
              f"skipped steps {summary['skipped_steps']}")
