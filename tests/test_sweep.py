"""squall sweep: the cross product, validation of every combination before the first run, the
files it writes, skipping finished runs, and Ctrl-C stopping after the current run. Runs are tiny
(digits, mlp, 20 steps, 1-2 workers) on this module's one Ray session."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.sweep import COLUMNS, combinations, plan_sweep, split_values

QUIET = ["log.progress=false", "eval.every=0", "model=mlp", "data=digits"]


def test_values_split_on_commas_unless_bracketed():
    assert split_values("workers=2,4,8") == ("workers", ["2", "4", "8"])
    assert split_values("strategy.pre=[nnm,bucketing]") == ("strategy.pre",
                                                            ["[nnm,bucketing]"])
    with pytest.raises(ConfigError, match="empty value"):
        split_values("workers=2,,4")


def test_cross_product_in_command_line_order():
    keys, combos = combinations(["workers=1,2", "steps=5", "optim.lr=0.1,0.2,0.3"])
    assert keys == ["workers", "optim.lr"]
    assert len(combos) == 6
    assert combos[0] == ["steps=5", "workers=1", "optim.lr=0.1"]
    assert combos[-1] == ["steps=5", "workers=2", "optim.lr=0.3"]
    with pytest.raises(ConfigError, match="a key is swept twice"):
        combinations(["workers=1,2", "workers=3,4"])


def test_every_combination_is_validated_before_anything_runs(tmp_path, capsys):
    # workers=1 optim.lr=0.1 is valid, the next one is not: nothing may have run
    code = main(["sweep", "workers=1,2", "optim.lr=0.1,-1", f"run.dir={tmp_path}",
                 "run.name=bad", *QUIET])
    err = capsys.readouterr().err
    assert code == 2
    assert "sweep run workers=1 optim.lr=-1: optim.lr=-1.0: must be > 0" in err
    assert not (tmp_path / "bad").exists()
    # group options and Byzantine requirements are checked per combination too
    with pytest.raises(ConfigError, match="sweep run strategy=krum: strategy=krum with "
                                          "workers=1"):
        plan_sweep(["workers=1", "strategy=mean,krum", *QUIET])


def _rows(folder):
    with open(folder / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_every_combination_and_writes_its_tables(ray_session, tmp_path, capsys):
    # two runs (the cross product itself is tested above, without Ray)
    args = ["sweep", "workers=1,2", "optim.lr=0.1", "steps=20", f"run.dir={tmp_path}",
            "run.name=sw", *QUIET]
    assert main(args) == 0
    folder = tmp_path / "sw"
    rows = _rows(folder)
    assert list(rows[0]) == COLUMNS
    assert [r["overrides"] for r in rows] == ["workers=1", "workers=2"]
    for r in rows:
        run_dir = folder / r["run"]
        assert (run_dir / "summary.json").exists() and (run_dir / "metrics.jsonl").exists()
        assert r["steps_done"] == "20" and r["interrupted"] == "False"
        assert 0.3 < float(r["test_acc"]) <= 1.0
    assert [float(r["live_workers_mean"]) for r in rows] == [1, 2]
    md = (folder / "sweep.md").read_text()
    assert md.count("\n| workers=") == 2 and "| test_acc" in md

    # the same command again: finished runs are kept, not run again
    stamps = {r["run"]: os.stat(folder / r["run"] / "summary.json").st_mtime_ns for r in rows}
    capsys.readouterr()
    assert main(args) == 0
    assert {r: os.stat(folder / r / "summary.json").st_mtime_ns for r in stamps} == stamps
    assert "sweep run 1/2" not in capsys.readouterr().out


def test_ctrl_c_stops_after_the_current_run_and_keeps_it(ray_session, tmp_path):
    """SIGINT while the first run trains (once its metrics show 5 steps): that run stops
    cleanly, is recorded as interrupted, and the second run never starts."""
    folder = tmp_path / "stop"
    first_metrics = folder / "workers=1" / "metrics.jsonl"

    stopped = threading.Event()

    def interrupt_when_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stopped.is_set():
            if first_metrics.exists() and len(first_metrics.read_text().splitlines()) >= 5:
                os.kill(os.getpid(), signal.SIGINT)
                stopped.wait(10)  # again only if the first one went unnoticed
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt_when_training, daemon=True)
    watcher.start()
    try:  # a bounded run: a lost signal fails the test instead of hanging the suite
        code = main(["sweep", "workers=1,2", "steps=20000", f"run.dir={tmp_path}",
                     "run.name=stop", *QUIET])
    finally:
        stopped.set()
    watcher.join()
    assert code == 130
    rows = _rows(folder)
    assert len(rows) == 1 and rows[0]["interrupted"] == "True"
    assert 5 <= int(rows[0]["steps_done"]) < 20000
    assert not (folder / "workers=2").exists()


def test_a_sweep_whose_runs_cannot_write_is_one_line_before_anything_runs(capsys):
    assert main(["sweep", "run.dir=/proc/x", "workers=2,3"]) == 2
    err = capsys.readouterr().err
    assert err == ("squall: error: sweep run workers=2: run.dir=/proc/x: cannot create "
                   "directories in /proc (No such file or directory)\n")
