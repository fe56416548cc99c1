"""Decentralized gossip training on a real local Ray cluster: D-PSGD, Moniqua, CHOCO."""

from __future__ import annotations

import json
import math
import os

import pytest
from procs import own_ray_workers

from orchestrator.config import ConfigError, load_config
from orchestrator.job import train

D_MLP = 64 * 128 + 128 + 128 * 10 + 10  # parameters of the mlp on 8x8 digits


@pytest.mark.parametrize("overrides, message", [
    (["strategy=gossip", "byzantine.f=1"], "not with strategy=gossip"),
    (["strategy=gossip", "strategy.compress=choco", "strategy.topology=one_peer_exp"],
     "needs a static topology"),
    (["strategy=gossip", "strategy.bits=3"], "strategy.bits=3: not allowed; valid: 1, 2, 4, 8"),
    (["strategy=gossip", "strategy.compress=moniqua", "strategy.bits=1"],
     "strategy.bits=1 needs strategy.rounding=nearest"),
    (["strategy=gossip", "strategy.topology=star"], "valid: ring, torus, exponential"),
])
def test_gossip_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def gossip(make_config, *overrides: str) -> tuple[dict, list[dict]]:
    summary = train(make_config("strategy=gossip", "workers=4", "steps=100", "model=mlp",
                                "optim.momentum=0", "optim.lr=0.1", *overrides))
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dpsgd(ray_session, tmp_path_factory):
    """One uncompressed D-PSGD run, shared by the tests that compare with it."""
    run_dir = tmp_path_factory.mktemp("dpsgd")
    summary = train(load_config(["strategy=gossip", "workers=4", "steps=100", "model=mlp",
                                 "optim.momentum=0", "optim.lr=0.1", f"run.dir={run_dir}",
                                 "log.progress=false", "eval.every=0"]))
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f]


def test_dpsgd_learns_and_sends_fp32_models(dpsgd):
    summary, rows = dpsgd
    assert summary["test_acc"] > 0.85
    assert summary["bytes_sent"] == 100 * 4 * 4 * D_MLP  # one fp32 model per worker per round
    assert all("consensus_dist" in r for r in rows)


def test_moniqua_8_bits_matches_dpsgd_with_a_quarter_of_the_bytes(dpsgd, make_config):
    dense, _ = dpsgd
    moniqua, rows = gossip(make_config, "strategy.compress=moniqua", "strategy.bits=8")
    assert moniqua["bytes_sent"] == 100 * 4 * (D_MLP + 13)  # 1 byte per value + 13-byte header
    assert abs(moniqua["test_acc"] - dense["test_acc"]) <= 0.02
    assert moniqua["wraps"] == 0 and rows[-1]["theta"] > 0


def test_moniqua_2_bits_is_really_packed(ray_session, make_config):
    summary, _ = gossip(make_config, "strategy.compress=moniqua", "strategy.bits=2",
                        "strategy.rounding=nearest", "steps=10")
    assert summary["bytes_sent"] == 10 * 4 * (math.ceil(D_MLP / 4) + 13)


def test_choco_runs(ray_session, make_config):
    summary, _ = gossip(make_config, "strategy.compress=choco", "strategy.gamma=0.3")
    assert summary["test_acc"] > 0.8
    assert summary["bytes_sent"] < 100 * 4 * 4 * D_MLP / 20  # 1 bit per value + a scale


def test_a_denser_topology_keeps_replicas_closer(ray_session, make_config):
    """Workers that each hold one class pull their replicas apart; mixing over the complete
    graph must keep them closer together than over a ring of 6."""
    skew = ("workers=6", "steps=40", "data.partition=classes_per_worker",
            "data.classes_per_worker=1")
    _, ring = gossip(make_config, *skew, "strategy.topology=ring")
    _, complete = gossip(make_config, *skew, "strategy.topology=complete")
    mean = lambda rows: sum(r["consensus_dist"] for r in rows[10:]) / len(rows[10:])  # noqa: E731
    assert mean(complete) < 0.8 * mean(ring)  # spectral gaps: 1 vs 1/3


def test_a_worker_removed_mid_training_drops_out_and_the_run_completes(ray_session,
                                                                        make_config):
    import signal
    import threading
    import time

    cfg = make_config("strategy=gossip", "workers=4", "steps=300", "model=mlp",
                      "optim.momentum=0", "optim.lr=0.1", "run.name=gkill",
                      "strategy.compress=moniqua", "strategy.bits=8")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train(cfg)))
    thread.start()
    metrics = os.path.join(cfg.run.dir, "gkill", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and
                                          len(open(metrics).readlines()) >= 20):
        time.sleep(0.2)
    os.kill(own_ray_workers("ray::GossipWorker")[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert result["steps_done"] == 300 and result["preemptions"] == 1
    with open(metrics) as f:
        live = [json.loads(line)["live_workers"] for line in f]
    assert live[0] == 4 and 3 in live
    assert result["test_acc"] > 0.85
