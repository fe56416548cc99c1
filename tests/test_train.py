"""The training job end to end on a real local Ray cluster (one Ray session for the module)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from procs import own_ray_workers
from workloads import calls

from orchestrator.data import batch_indices, digits, partition
from orchestrator.models import mlp
from orchestrator.optimizer import build_optimizer
from orchestrator.run import train

SUMMARY_KEYS = {"test_acc", "steps_done", "wall_s", "live_workers_mean", "bytes_sent",
                "cost_usd", "preemptions", "skipped_steps"}


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_default_job_learns_digits(ray_session, make_config):
    cfg = make_config("eval.every=100")
    summary = train(cfg)
    assert summary["test_acc"] >= 0.95
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps_done"] == cfg.steps and summary["skipped_steps"] == 0
    assert summary["live_workers_mean"] == 4
    rows = read_metrics(summary["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    assert {"step", "loss", "live_workers", "step_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "test_acc" in r] == [100, 200, 300]
    n_params = sum(p.numel() for p in torch.load(os.path.join(summary["run_dir"], "model.pt"),
                                                  weights_only=True).values())
    # the collective plane (worker.plane=auto with mean): a ring all-reduce of the float32
    # gradient (the CNN has no BatchNorm buffers) moves 2 (n - 1) / n of it out of and into
    # each of the n workers, every step; down, also the driver's model that every member of
    # the first group receives (as DDP broadcasts rank 0's; SGD's optimizer state is empty)
    assert summary["plane"] == "collective"
    assert summary["bytes_sent"] == summary["bytes_up"] == cfg.steps * 2 * 3 * n_params * 4
    assert summary["bytes_down"] == summary["bytes_up"] + 4 * n_params * 4
    assert summary["bytes_measure"] == 0
    assert rows[-1]["bytes_down"] == summary["bytes_down"]
    on_disk = json.load(open(os.path.join(summary["run_dir"], "summary.json")))
    assert on_disk["test_acc"] == summary["test_acc"]
    assert os.path.exists(os.path.join(summary["run_dir"], "config.yaml"))


@pytest.mark.parametrize("overrides", [
    ["workers=1"],
    ["workers=8"],
    ["data.partition=classes_per_worker", "data.classes_per_worker=2"],
])
def test_job_variants_run(ray_session, make_config, overrides):
    summary = train(make_config("steps=40", *overrides))
    assert summary["steps_done"] == 40
    assert summary["test_acc"] > 0.5  # learning, well above chance (0.1)


def test_driver_plane_counts_gradients_up_and_parameters_down(ray_session, make_config):
    cfg = make_config("worker.plane=driver", "workers=3", "steps=5", "model=mlp")
    summary = train(cfg)
    n_params = sum(p.numel() for p in torch.load(os.path.join(summary["run_dir"], "model.pt"),
                                                  weights_only=True).values())
    # up: the gradients that arrived; down: the parameters every worker read, every step
    assert summary["plane"] == "driver"
    assert summary["bytes_sent"] == summary["bytes_up"] == cfg.steps * 3 * n_params * 4
    assert summary["bytes_down"] == cfg.steps * 3 * n_params * 4


@pytest.mark.parametrize("plane", ["driver", "collective"])
def test_parameter_server_step_matches_a_local_reference(ray_session, make_config, plane):
    """Mean-aggregated SGD over 3 actors (through the driver, or all-reduced among the
    workers) equals single-process SGD on the same batches."""
    cfg = make_config("workers=3", "steps=6", "model=mlp", "optim.lr=0.1",
                      f"worker.plane={plane}")
    summary = train(cfg)
    got = torch.load(os.path.join(summary["run_dir"], "model.pt"), weights_only=True)

    x_train, y_train = digits("train").tensors
    shards = partition(y_train.numpy(), cfg.workers, cfg.data, cfg.seed, 10)
    torch.manual_seed(cfg.seed)
    model = mlp((1, 8, 8), 10)
    optimizer = build_optimizer(cfg.optim, list(model.parameters()))
    for step in range(1, cfg.steps + 1):
        grads = []
        for rank, shard in enumerate(shards):
            idx = shard[batch_indices(len(shard), cfg.data.batch_size, step, cfg.seed, rank)]
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in grads) / len(grads)
        optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.allclose(got[name], value, atol=1e-6), name


def test_killed_worker_drops_out_and_is_replaced(ray_session, make_config, tmp_path):
    """SIGKILL one worker process mid-run: the step completes with the workers that answer,
    and a replacement joins without restarting the job, loading its own shard."""
    log = tmp_path / "calls.txt"
    cfg = make_config("steps=400", "run.name=kill",
                      "data.target=tests.workloads:recording_digits", f"data.args.log={log}")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train(cfg)))
    thread.start()
    metrics = os.path.join(cfg.run.dir, "kill", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and
                                          len(open(metrics).readlines()) >= 20):
        time.sleep(0.2)
    pids = own_ray_workers("ray::CollectiveWorker")
    assert len(pids) >= 4
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert result["steps_done"] == 400
    live = [r["live_workers"] for r in read_metrics(os.path.join(cfg.run.dir, "kill"))]
    assert live[0] == 4 and 3 in live and live[-1] == 4
    assert result["preemptions"] == 1 and result["joins"] == 1 and result["lost_steps"] == 0
    assert result["test_acc"] >= 0.9
    # every worker, the replacement too, loaded its own shard in its own process
    loaders = [pid for split, pid in calls(log) if split == "train"]
    assert len(set(loaders)) == 5 and pids[-1] in loaders[:4] and loaders[4] not in pids


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                          (signal.SIGHUP, 129)])
def test_ctrl_c_stops_cleanly_with_summary(tmp_path, signum, code):
    """SIGINT (Ctrl-C), SIGTERM (`kill`, `ray job stop`) or SIGHUP (a closed terminal) to a
    real `squall train` process: checkpoint, model and summary written, Ray shut down, exit
    128 + the signal's number."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train", "steps=100000", "workers=2",
         f"run.dir={tmp_path}", "run.name=stop", "log.progress=false", "eval.every=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps_done"] >= 5
    assert summary["signal"] == signal.Signals(signum).name
    assert "interrupted" in out and "Traceback" not in err
    assert np.isfinite(summary["test_acc"])
    assert (tmp_path / "stop" / "model.pt").exists()
    assert (tmp_path / "stop" / "checkpoints" / f"ckpt-{summary['steps_done']:09d}.pt").exists()


def test_hung_worker_times_out_and_is_replaced(ray_session, make_config):
    """A worker that stops answering (SIGSTOP: a hung node) is dropped after
    worker.step_timeout_s and replaced; the run completes."""
    cfg = make_config("steps=500", "run.name=hang", "worker.step_timeout_s=2",
                      "worker.plane=driver")  # one step per call: the timed-out step is one row
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train(cfg)))
    thread.start()
    metrics = os.path.join(cfg.run.dir, "hang", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and
                                          len(open(metrics).readlines()) >= 20):
        time.sleep(0.2)
    pid = own_ray_workers("ray::Worker")[-1]
    os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert result["steps_done"] == 500
    rows = read_metrics(os.path.join(cfg.run.dir, "hang"))
    first_short = next(r for r in rows if r["live_workers"] == 3)  # the step that timed out
    assert first_short["step_s"] >= 2
    assert result["preemptions"] == 1 and result["joins"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_workers_train_on_the_gpu(ray_session, make_config):
    summary = train(make_config("steps=50", "worker.device=cuda", "workers=2"))
    assert summary["steps_done"] == 50 and summary["test_acc"] > 0.8


def test_worker_device_cuda_without_a_gpu_is_a_clear_error(ray_session, make_config):
    if ray_session.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has a GPU")
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="worker.device=cuda: the Ray cluster has no GPU"):
        train(make_config("steps=5", "worker.device=cuda"))
