"""Checkpoints in the job: a driver killed with SIGKILL resumes from its newest valid
checkpoint and ends with exactly the parameters of an uninterrupted run; s3:// works too."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
import torch
from moto_server import fake_aws_env, moto_server

SQUALL = [sys.executable, "-m", "orchestrator", "train"]
COMMON = ["steps=60", "workers=2", "model=mlp", "log.progress=false", "eval.every=0",
          "checkpoint.every_steps=5"]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def kill_when(run_dir: Path, args: list[str], step: int) -> str:
    """Start a run, SIGKILL its whole process group (driver and local Ray) once it has logged
    `step`; returns what it printed on stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and last_step(run_dir) < step:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[1]


# A user's own workload (examples/shapes): exact resume holds for it as for the built-ins.
USER_WORKLOAD = ["model.target=examples.shapes.shapes:make_model",
                 "data.target=examples.shapes.shapes:make_data", "data.args.samples=400"]


def test_sigkill_at_three_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A user's workload killed at three random points (the newest checkpoint damaged by
    hand after the second), then resumed to the end: bitwise the uninterrupted run's model.
    (benchmarks/chaos.py does it 20 times.)"""
    args = [*SQUALL, *[a for a in COMMON if a != "model=mlp"], *USER_WORKLOAD,
            f"run.dir={tmp_path}"]
    subprocess.run([*args, "run.name=ref"], check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / "killed"
    args = [*args, "run.name=killed"]
    rng = random.Random(11)
    stderr_after_truncation = ""
    for attempt in range(3):
        target = last_step(run_dir) + rng.randint(3, 10)  # a random point past the last one
        err = kill_when(run_dir, args, target)
        if attempt == 2:
            stderr_after_truncation = err
        if attempt == 1:  # damage the newest checkpoint by hand: the next resume must skip it
            newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert "skipping it, falling back to the previous checkpoint" in stderr_after_truncation

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 60 and summary["lost_steps"] > 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == list(range(1, 61))  # redone steps replace their first attempt's lines

    ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    got = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    changed = subprocess.run([*args, "model.args.width=8"], capture_output=True, text=True,
                             timeout=120)
    assert changed.returncode == 2
    assert changed.stderr.strip() == (
        "squall: error: run.name=killed has a checkpoint made with other 'model' settings "
        "({'name': 'custom', 'target': 'examples.shapes.shapes:make_model', 'args': {}} vs "
        "{'name': 'custom', 'target': 'examples.shapes.shapes:make_model', 'args': "
        "{'width': 8}}); use another run.name")


@pytest.fixture
def s3(monkeypatch):
    with moto_server() as endpoint:
        fake_aws_env(monkeypatch)
        monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpts")
        yield endpoint


def test_s3_checkpoint_dir_resumes_a_longer_run(s3, tmp_path):
    args = [*SQUALL, "workers=2", "model=mlp", "log.progress=false", "eval.every=0",
            f"run.dir={tmp_path}", "run.name=s3run", "checkpoint.dir=s3://ckpts/runs/s3run"]
    first = subprocess.run([*args, "steps=20"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(
        Bucket="ckpts", Prefix="runs/s3run/")["Contents"]]
    assert "runs/s3run/ckpt-000000020.pt" in keys and "runs/s3run/ckpt-000000020.json" in keys

    second = subprocess.run([*args, "steps=30"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    summary = json.loads((tmp_path / "s3run" / "summary.json").read_text())
    assert summary["steps_done"] == 30 and summary["lost_steps"] == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "s3run" / "metrics.jsonl").open()]
    assert steps == list(range(1, 31))


def test_a_checkpoint_of_the_old_layout_is_refused_in_one_line(tmp_path):
    """squall 0.1 saved the parameter server's state at the top level of the checkpoint
    (model, optimizer, aggregation_prev); the run frame saves it under "strategy" with a
    format number. Such a run is refused before Ray starts, in one line, exit status 2."""
    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.config import load_config, to_dict

    cfg = load_config(["workers=2", "model=mlp", f"run.dir={tmp_path}", "run.name=old"])
    old = {"model": {}, "optimizer": {"state": {}, "param_groups": []}, "rng": {},
           "progress": {"step": 5}, "aggregation_prev": None}
    CheckpointStore(str(tmp_path / "old" / "checkpoints")).save(5, old, {"config": to_dict(cfg)})
    proc = subprocess.run([*SQUALL, "workers=2", "model=mlp", f"run.dir={tmp_path}",
                           "run.name=old", "log.progress=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "checkpoint of step 5 was written by an older squall" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_bookkeeping_finished_shorter_longer_and_unreadable(tmp_path):
    """A finished run is not started again (no Ray: nothing appears in RAY_TMPDIR); fewer
    steps than it made is a one-line error; more steps continue it, saying from where; a run
    whose checkpoints are all unreadable is refused instead of starting over on its history."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    args = [*SQUALL, "workers=2", "model=mlp", "log.progress=false", "eval.every=0",
            "checkpoint.every_steps=5", f"run.dir={tmp_path}", "run.name=book"]
    run_dir = tmp_path / "book"

    def squall(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=300,
                              env=env)

    assert squall("steps=10").returncode == 0
    shutil.rmtree(ray_tmp)
    ray_tmp.mkdir()
    again = squall("steps=10")
    assert again.returncode == 0, again.stderr
    assert f"squall: run {run_dir} already finished at step 10" in again.stdout
    assert list(ray_tmp.iterdir()) == []  # Ray never started
    shutil.rmtree(ray_tmp)
    env.pop("RAY_TMPDIR")

    shorter = squall("steps=5")
    assert shorter.returncode == 2 and shorter.stderr.count("\n") == 1
    assert shorter.stderr == (f"squall: error: steps=5: run {run_dir} already went to step 10; "
                              "give steps >= 10 to continue it\n")

    longer = squall("steps=15")
    assert longer.returncode == 0, longer.stderr
    assert f"squall: resuming run {run_dir} from step 10" in longer.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps_done"] == 15

    history = (run_dir / "metrics.jsonl").read_text()
    for ckpt in (run_dir / "checkpoints").glob("ckpt-*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    broken = squall("steps=20")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "can be read: move them away to start the run over" in broken.stderr.splitlines()[-1]
    assert (run_dir / "metrics.jsonl").read_text() == history  # nothing lost


def test_steps_redone_are_counted_when_killed_before_the_first_checkpoint(tmp_path):
    args = [*SQUALL, "steps=20", "workers=2", "model=mlp", "log.progress=false", "eval.every=0",
            "checkpoint.every_steps=1000", f"run.dir={tmp_path}", "run.name=early"]
    kill_when(tmp_path / "early", args, 8)
    done = last_step(tmp_path / "early")
    assert done >= 8
    finished = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads((tmp_path / "early" / "summary.json").read_text())
    assert summary["lost_steps"] == done and summary["steps_done"] == 20


def test_steps_redone_add_up_over_crashes_between_the_same_checkpoints(tmp_path, make_config):
    """Two crashes after the same checkpoint (step 10): the first redoes steps 11-30, the
    second steps 11-25. The count lives in the run directory, not in the checkpoint that
    both resumes read, so it is 35, not 15."""
    from orchestrator.metrics import RunLog

    log = RunLog(make_config("run.name=crashes"), tmp_path / "crashes")

    def crash_at(last: int) -> None:
        with open(log.dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, last + 1))

    crash_at(30)
    assert log.open_metrics(10) == 20
    log._metrics.close()
    crash_at(25)
    assert log.open_metrics(10) == 35
    log._metrics.close()
    assert log.open_metrics(25) == 35  # nothing past the checkpoint: nothing more redone


def test_a_supervised_driver_killed_is_relaunched_and_resumes_then_stops_on_sigterm(tmp_path):
    """run.restarts=2: SIGKILL the driver (its whole process group, as a crashed machine
    would) and the supervisor relaunches it on the same run, which resumes from its newest
    checkpoint; a SIGTERM to the supervisor then stops the job as it would stop one driver
    (exit 143, a summary, no relaunch)."""
    run_dir = tmp_path / "supervised"
    args = [*SQUALL, *[a for a in COMMON if not a.startswith("steps=")], "steps=100000",
            f"run.dir={tmp_path}", "run.name=supervised", "run.restarts=2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def driver() -> int:  # the supervisor's child: the driver, leader of its own group
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return int(children[0])

    def wait_for(step: int) -> None:
        deadline = time.time() + 180  # a guard against a hang, not a speed test
        while time.time() < deadline and proc.poll() is None and last_step(run_dir) < step:
            time.sleep(0.05)
        assert last_step(run_dir) >= step, proc.poll()

    try:
        wait_for(12)
        first = driver()
        os.killpg(first, signal.SIGKILL)
        killed_at = last_step(run_dir)
        wait_for(killed_at + 10)  # the relaunched driver trains past the kill
        assert driver() != first
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr
    assert stderr.count("relaunching it") == 1, stderr
    assert "(1 of run.restarts=2): run supervised resumes from its newest checkpoint" in stderr
    assert "squall: resuming run" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] and summary["signal"] == "SIGTERM"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= killed_at + 10
    # the steps since the newest checkpoint (every 5): one killed while writing the
    # checkpoint of the step it had just logged falls back to the one before
    since = killed_at % 5
    assert summary["lost_steps"] in ({since} if since else {0, 5})
