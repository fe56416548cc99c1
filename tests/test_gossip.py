"""Decentralized gossip training on a real local Ray cluster: D-PSGD, Moniqua, CHOCO."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from procs import own_ray_workers

from orchestrator.config import ConfigError, load_config
from orchestrator.run import train

D_MLP = 64 * 128 + 128 + 128 * 10 + 10  # parameters of the mlp on 8x8 digits
BLOCKS = math.ceil(D_MLP / 128)  # Moniqua's blocks (strategy.block_size=128)
HEADER = 9 + BLOCKS  # Moniqua: count, bits, block size; a byte per block


@pytest.mark.parametrize("overrides, message", [
    (["strategy=gossip", "byzantine.f=1"], "not with strategy=gossip"),
    (["strategy=gossip", "strategy.compress=choco", "strategy.topology=one_peer_exp"],
     "needs a static topology"),
    (["strategy=gossip", "strategy.bits=3"], "strategy.bits=3: not allowed; valid: 1, 2, 4, 8"),
    (["strategy=gossip", "strategy.compress=moniqua", "strategy.bits=1",
      "strategy.rounding=stochastic"], "strategy.bits=1 needs strategy.rounding=dither or nearest"),
    (["strategy=gossip", "strategy.topology=star"], "valid: ring, torus, exponential"),
    (["strategy=gossip", "cloud.preempt_prob=0.1"], "cloud.preempt_prob needs cloud=simulated"),
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
    assert moniqua["bytes_sent"] == 100 * 4 * (D_MLP + HEADER)  # 1 byte per value + header
    assert abs(moniqua["test_acc"] - dense["test_acc"]) <= 0.02
    assert moniqua["wraps"] == 0 and rows[-1]["theta"] > 0
    assert moniqua["theta_breaches"] == 0


def test_moniqua_2_bits_keeps_replicas_together_with_15x_fewer_bytes(dpsgd, make_config):
    dense, dense_rows = dpsgd
    summary, rows = gossip(make_config, "strategy.compress=moniqua", "strategy.bits=2")
    assert summary["bytes_sent"] == 100 * 4 * (math.ceil(D_MLP / 4) + HEADER)
    assert dense["bytes_sent"] / summary["bytes_sent"] > 15
    assert summary["test_acc"] >= dense["test_acc"] - 0.03
    # The replicas agree: consensus distance of the order of D-PSGD's, not drifting apart.
    late = lambda rows: sum(r["consensus_dist"] for r in rows[-20:]) / 20  # noqa: E731
    assert late(rows) < 5 * late(dense_rows), (late(rows), late(dense_rows))
    assert summary["wraps"] == 0
    assert summary["theta_breaches"] == 0 and rows[-1]["theta_breaches"] == 0  # within theta


def test_one_bit_moniqua_reports_replicas_further_apart_than_theta(ray_session, make_config,
                                                                  caplog):
    """At 1 bit the workers' jump check is off, so their decodes cannot flag a wrap; the
    driver's consensus measurement finds the neighbours further apart than theta (here from
    about step 16 on) and counts it, with one warning."""
    summary, rows = gossip(make_config, "strategy.compress=moniqua", "strategy.bits=1",
                           "run.name=onebit")
    assert summary["wraps"] == 0 and summary["theta_breaches"] > 0
    counts = [r["theta_breaches"] for r in rows]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == summary["theta_breaches"]
    warned = [r for r in caplog.records if "differ by more than Moniqua's theta" in r.message]
    assert len(warned) == 1


def test_gossip_resumes_from_its_checkpoint(ray_session, make_config):
    first, _ = gossip(make_config, "strategy.compress=moniqua", "steps=30", "run.name=gres",
                      "checkpoint.every_steps=10")
    second, rows = gossip(make_config, "strategy.compress=moniqua", "steps=50",
                          "run.name=gres", "checkpoint.every_steps=10")
    assert first["steps_done"] == 30 and second["steps_done"] == 50
    assert [r["step"] for r in rows] == list(range(1, 51)) and second["lost_steps"] == 0
    assert rows[30]["theta"] < 1.0  # theta came back from the checkpoint, not from scratch
    assert second["wraps"] == 0 and second["test_acc"] > 0.5


def test_choco_runs(ray_session, make_config):
    summary, _ = gossip(make_config, "strategy.compress=choco", "strategy.gamma=0.3")
    assert summary["test_acc"] > 0.8
    assert summary["bytes_sent"] < 100 * 4 * 4 * D_MLP / 20  # 1 bit per value + a scale


def test_a_finished_run_frees_its_workers_cpus_at_once(ray_session, make_config):
    """The next run in the same Ray session (a sweep, a notebook) must not wait for them:
    gossip workers hold handles to each other, which kept them alive after the run."""
    total = ray_session.cluster_resources()["CPU"]
    for strategy in ("mean", "gossip"):
        train(make_config(f"strategy={strategy}", "workers=4", "steps=3", "model=mlp"))
        deadline = time.time() + 3
        while ray_session.available_resources().get("CPU", 0) < total and (
                time.time() < deadline):
            time.sleep(0.05)
        assert ray_session.available_resources().get("CPU", 0) == total, strategy


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
    os.kill(own_ray_workers("ray::GossipWorker")[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert result["steps_done"] == 300 and result["preemptions"] == 1
    with open(metrics) as f:
        live = [json.loads(line)["live_workers"] for line in f]
    assert live[0] == 4 and 3 in live
    assert result["test_acc"] > 0.85


# ------------------------------------------------------------- bytes both ways

RING, STEPS = 4, 32  # 4 workers on a ring: 2 neighbours each


@pytest.fixture(scope="module")
def ring_runs(ray_session, tmp_path_factory):
    """An fp32 (D-PSGD) and a 2-bit Moniqua run on the same ring, same steps; consensus_dist
    measured every 5 steps (and at the last)."""
    runs = {}
    for compress, extra in (("none", []), ("moniqua", ["strategy.bits=2"])):
        run_dir = tmp_path_factory.mktemp(compress)
        summary = train(load_config([
            "strategy=gossip", "strategy.topology=ring", f"workers={RING}", f"steps={STEPS}",
            "model=mlp", "optim.momentum=0", "optim.lr=0.1", f"strategy.compress={compress}",
            "strategy.consensus_every=5", *extra, f"run.dir={run_dir}", "log.progress=false",
            "eval.every=0"]))
        with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
            runs[compress] = summary, [json.loads(line) for line in f]
    return runs


def test_fp32_gossip_counts_each_message_once_up_and_per_fetching_neighbour_down(ring_runs):
    summary, _ = ring_runs["none"]
    message = 4 * D_MLP  # one fp32 model
    assert summary["bytes_up"] == STEPS * RING * message == summary["bytes_sent"]
    # Every worker fetches its two neighbours' messages; D-PSGD has no control traffic.
    assert summary["bytes_down"] == STEPS * RING * 2 * message == 2 * summary["bytes_up"]


def test_moniqua_2_bits_sends_14x_fewer_bytes_than_fp32_control_included(ring_runs):
    dense, _ = ring_runs["none"]
    summary, rows = ring_runs["moniqua"]
    assert summary["wraps"] == 0  # no resync: its all-gather would count as bytes_up
    message = math.ceil(D_MLP / 4) + HEADER
    assert summary["bytes_sent"] == STEPS * RING * message
    # Up: the message, max_diff and max_step as a byte per block, the wrap count (int32).
    assert summary["bytes_up"] == STEPS * RING * (message + 2 * BLOCKS + 4)
    # Down: the two neighbours' messages, and theta as a byte per block (a single theta, one
    # byte, in the first round).
    assert summary["bytes_down"] == STEPS * RING * 2 * message + RING * (1 + (STEPS - 1) * BLOCKS)
    total = lambda s: s["bytes_up"] + s["bytes_down"]  # noqa: E731
    ratio = total(dense) / total(summary)
    assert ratio >= 14, ratio
    assert ratio < dense["bytes_sent"] / summary["bytes_sent"]  # control counts
    assert rows[-1]["bytes_up"] == summary["bytes_up"]


def test_consensus_measurement_is_counted_apart_on_its_steps_only(ring_runs):
    for compress, (summary, rows) in ring_runs.items():
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        measured = [b["bytes_measure"] - a["bytes_measure"]
                    for a, b in zip([{"bytes_measure": 0}] + rows, rows)]
        due = [r["step"] % 5 == 0 or r["step"] == STEPS for r in rows]
        # Each measurement pulls every replica (fp32) through the driver.
        assert measured == [RING * 4 * D_MLP if d else 0 for d in due], compress
        assert [("consensus_dist" in r) for r in rows] == due
        assert summary["bytes_measure"] == sum(due) * RING * 4 * D_MLP
