"""squall report: PNG plots and index.html from a real tiny run, from older metrics without time
stamps, and from a sweep; TensorBoard logging (log.tensorboard=true)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.report import report
from orchestrator.run import train
from orchestrator.sweep import write_tables

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 5000  # a real figure, not an empty file


def test_run_report_from_a_real_run(ray_session, make_config, capsys):
    summary = train(make_config("workers=2", "steps=20", "model=mlp", "eval.every=5",
                                "run.name=r"))
    run_dir = summary["run_dir"]
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    # the per-step record carries a time stamp and the cost so far, both non-decreasing
    walls = [r["wall_s"] for r in rows]
    costs = [r["on_demand_cost_usd"] for r in rows]
    assert walls == sorted(walls) and costs == sorted(costs)  # cloud=local: priced 0
    assert walls[-1] <= summary["wall_s"]

    assert main(["report", run_dir]) == 0
    assert "index.html" in capsys.readouterr().out
    folder = Path(run_dir)
    names = ["loss.png", "accuracy.png", "workers.png", "cost.png", "bytes.png"]
    for name in names:
        assert _is_png(folder / name), name
    page = (folder / "index.html").read_text()
    for name in names:
        assert f"src='{name}'" in page
    assert "<th>test_acc</th>" in page and f"{summary['test_acc']:.6g}" in page


def test_report_of_metrics_without_time_stamps(tmp_path):
    """Older runs have no wall_s/cost per step: plots use summed step times, no cost plot."""
    rows = [{"step": i, "loss": 2.0 / i, "live_workers": 3 if i < 5 or i > 7 else 2,
             "step_s": 0.1, "bytes_sent": 1000 * i} for i in range(1, 11)]
    rows[9]["test_acc"] = 0.9
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(tmp_path)
    assert all(_is_png(tmp_path / n) for n in ("loss.png", "accuracy.png", "workers.png",
                                               "bytes.png"))
    assert not (tmp_path / "cost.png").exists()
    assert "workers.png" in (tmp_path / "index.html").read_text()


def test_sweep_report_plots_against_workers(tmp_path):
    rows = [{"run": f"workers={n}+cloud.preempt_prob={q}",
             "overrides": f"workers={n} cloud.preempt_prob={q}", "test_acc": str(0.8 + n / 100),
             "steps_done": "20", "wall_s": str(10 + n), "cost_usd": str(n * 0.001),
             "on_demand_cost_usd": str(n * 0.004), "preemptions": "0",
             "live_workers_mean": str(n), "interrupted": "False", "error": ""}
            for n in (1, 2, 4) for q in (0, 0.1)]
    write_tables(tmp_path, rows)
    index = report(tmp_path)
    for column in ("test_acc", "cost_usd", "wall_s"):
        assert _is_png(tmp_path / f"sweep_{column}.png")
    page = index.read_text()
    assert page.count("<tr>") == 7 and "workers=4 cloud.preempt_prob=0.1" in page


def test_report_of_something_else_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a run directory"):
        report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report"]) == 2
    assert capsys.readouterr().err.count("squall: error:") == 2


def test_tensorboard_logging(ray_session, make_config):
    cfg = make_config("workers=1", "steps=5", "model=mlp", "run.name=tb", "log.tensorboard=true")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="log.tensorboard=true needs the tensorboard"):
            train(cfg)
        return
    summary = train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{summary['run_dir']}/tensorboard")
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert "live_workers" in events.Tags()["scalars"]


def test_a_partial_last_metrics_line_is_dropped_on_resume(make_config):
    """A crash mid-write (or a full disk) leaves half a line: resume redoes that step instead
    of failing on it; damage inside the file is still an error."""
    from orchestrator.metrics import RunLog, read_metrics

    log = RunLog(make_config("run.name=partial"))
    path = log.dir / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(log.dir)] == [1, 2]
    assert log.open_metrics(2) == 0  # nothing past step 2 survived
    assert [r["step"] for r in read_metrics(log.dir)] == [1, 2]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(log.dir)
