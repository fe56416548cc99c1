"""Spot pools: traces, configuration rules, and training on a real local multi-node Ray cluster
where preemption removes nodes (cloud=simulated)."""

from __future__ import annotations

import json
import math
import os

import pytest

from cloud.draws import spot_rng
from cloud.traces import availability, load_trace, synthetic_trace, write_trace
from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import ConfigError, job_spec, load_config
from orchestrator.planner import replay_live_workers
from orchestrator.run import train


def test_synthetic_trace_round_trips_through_the_ec2_csv_layout(tmp_path):
    path = tmp_path / "trace.csv"
    write_trace(synthetic_trace(hours=48, base=0.1, on_demand=0.4, seed=3), str(path))
    header = path.read_text().splitlines()[0]
    assert header == "Timestamp,AvailabilityZone,InstanceType,ProductDescription,SpotPrice"
    trace = load_trace(str(path))
    assert trace.instance_type == "m5.large" and trace.duration == pytest.approx(48 * 3600 - 300)
    assert min(trace.prices) > 0 and max(trace.prices) > 0.25  # it has spikes
    assert 0.5 < availability(trace, 0.2) < 1.0 and availability(trace, 10.0) == 1.0


def test_trace_lookup_is_a_step_function(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Timestamp,AvailabilityZone,InstanceType,ProductDescription,SpotPrice\n"
                    "2026-01-01T01:00:00Z,us-east-1a,c5.large,Linux/UNIX,0.5\n"
                    "2026-01-01T00:00:00Z,us-east-1a,c5.large,Linux/UNIX,0.1\n"
                    "2026-01-01T00:00:00Z,us-east-1a,m5.large,Linux/UNIX,9.9\n"
                    "2026-01-01T02:00:00Z,us-east-1a,c5.large,Linux/UNIX,0.2\n")
    trace = load_trace(str(path), "c5.large")
    assert [trace.price_at(t) for t in (-5, 0, 3599, 3600, 7200, 1e9)] == [
        0.1, 0.1, 0.1, 0.5, 0.2, 0.2]
    assert trace.next_change_above(0, 0.3) == 3600 and trace.next_change_above(3600, 0.3) is None
    with pytest.raises(ValueError, match="cloud.instance_type=g5.xlarge: not in .*valid: "
                                         "c5.large, m5.large"):
        load_trace(str(path), "g5.xlarge")


def test_preemption_draws_depend_only_on_seed_and_step():
    assert spot_rng(1, 7).random() == spot_rng(1, 7).random()
    assert spot_rng(1, 7).random() != spot_rng(1, 8).random()


@pytest.mark.parametrize("overrides, message", [
    (["cloud.preempt_prob=0.1"], "cloud.preempt_prob needs cloud=simulated"),
    (["cloud=simulated", "cloud.preempt_prob=1.5"], "cloud.preempt_prob=1.5: must be < 1"),
    (["cloud=simulated", "cloud.trace=x.csv", "cloud.preempt_prob=0.1"],
     "two preemption models"),
    (["cloud=simulated", "cloud.preempt_prob=0.1", "cloud.reclaims_per_hour=2"],
     "cloud.preempt_prob and cloud.reclaims_per_hour are two preemption models"),
    (["cloud=simulated", "cloud.reclaims_per_hour=-1"],
     "cloud.reclaims_per_hour=-1.0: must be >= 0"),
    (["cloud=simulated", "cloud.reclaims_per_hour=2", "cloud.replace_delay_steps=0"],
     "with cloud.reclaims_per_hour use cloud.replace_delay_s"),
    (["cloud=simulated", "workers=4", "cloud.on_demand_workers=5"], "must be <= workers=4"),
    (["cloud=simulated", "workers=4", "cloud.max_nodes=2"], "must be >= workers=4"),
])
def test_pool_options_are_checked_before_ray_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_missing_trace_file_is_a_one_line_error(make_config):
    with pytest.raises(ConfigError, match="cloud.trace=/nonexistent.csv: cannot read it"):
        train(make_config("cloud=simulated", "cloud.trace=/nonexistent.csv"))


def test_chaos_run_replaces_capacity_and_keeps_accuracy(make_config):
    """Enough preemptions to remove >= 10 nodes in one run: it finishes, capacity is replaced,
    and the model still learns (a clean run of this job reaches about 0.97; the comparison
    with a clean run on the same seed, within 2 points, is benchmarks/chaos.py's)."""
    # A replacement needs a few seconds (new Ray node, new worker process) while a step takes
    # about 20 ms and the loop does not wait for it: q is kept small and the run long, so that
    # most reclaims happen long enough before the end for their replacement to join. The
    # driver plane's steps set that pace here: on the collective plane's (3x shorter, and
    # its busy workers slow the node starts on 2 cores) most of the run would be over before
    # the first replacement joins. The collective plane's own losses and joins are
    # tests/test_collective.py's; the other runs in this module use it.
    chaos = train(make_config("workers=6", "steps=1200", "model=mlp", "run.name=chaos",
                              "cloud=simulated", "cloud.preempt_prob=0.005",
                              "cloud.replace_delay_s=0", "worker.plane=driver"))
    assert chaos["steps_done"] == 1200 and chaos["lost_steps"] == 0
    assert chaos["preemptions"] >= 10
    assert chaos["joins"] >= 5
    assert chaos["test_acc"] >= 0.93
    live = [json.loads(line)["live_workers"]
            for line in open(os.path.join(chaos["run_dir"], "metrics.jsonl"))]
    assert min(live) < 6 and any(b > a for a, b in zip(live, live[1:]))  # capacity returns
    assert 0 < chaos["cost_usd"] < chaos["on_demand_cost_usd"]


def test_price_spike_above_the_bid_reclaims_everyone_with_notice(tmp_path, make_config):
    """A trace whose price passes the bid for a while: every spot worker gets a notice and
    leaves, steps with nobody alive are skipped, and capacity returns when the price drops."""
    rows = [("2026-01-01T00:00:00Z", 0.1), ("2026-01-01T01:00:00Z", 0.9),
            ("2026-01-01T03:00:00Z", 0.1)]
    path = tmp_path / "spike.csv"
    path.write_text("Timestamp,AvailabilityZone,InstanceType,ProductDescription,SpotPrice\n" +
                    "".join(f"{t},us-east-1a,m5.large,Linux/UNIX,{p}\n" for t, p in rows))
    # 1 wall second = 2 trace hours: the price is above the bid from 0.5 s to 1.5 s into
    # training; the steps are enough for a replacement node to start after that (a few s).
    # The replacements asked for at the first notices arrive 0.2 s later, just before the
    # spike, and get a notice at once; theirs arrive after it.
    summary = train(make_config("workers=2", "steps=2500", "model=mlp", "run.name=spike",
                                "cloud=simulated", f"cloud.trace={path}", "cloud.bid=0.4",
                                "cloud.time_scale=7200", "cloud.notice_s=0.25",
                                "cloud.replace_delay_s=0.2", "cloud.max_nodes=6",
                                "checkpoint.every_s=5"))
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert summary["preemptions"] == 2 and summary["joins"] >= 1  # replacements (max_nodes=6)
    assert summary["skipped_steps"] > 0
    zero = [r["step"] for r in rows if r["live_workers"] == 0]
    assert rows[-1]["live_workers"] >= 1 and zero[-1] < rows[-1]["step"]


def test_squall_trace_writes_a_usable_trace(tmp_path, capsys):
    from orchestrator.cli import main

    path = tmp_path / "t.csv"
    assert main(["trace", str(path), "hours=2", "seed=4"]) == 0
    assert load_trace(str(path)).duration == pytest.approx(2 * 3600 - 300)
    assert main(["trace", str(path), "hourz=2"]) == 2
    assert "unknown option 'hourz'; valid: hours, base" in capsys.readouterr().err


def test_gossip_on_a_spot_pool_drops_reclaimed_workers_and_continues(make_config):
    """strategy=gossip on cloud=simulated: a reclaimed worker leaves the topology (W is rebuilt
    over the live workers), its replacement starts from a live neighbour's model."""
    summary = train(make_config("strategy=gossip", "strategy.compress=moniqua", "strategy.bits=2",
                                "workers=4", "steps=300", "model=mlp", "optim.momentum=0",
                                "optim.lr=0.1", "run.name=gspot", "cloud=simulated",
                                "cloud.preempt_prob=0.004", "cloud.replace_delay_s=0",
                                "cloud.notice_s=0.2", "checkpoint.every_steps=0"))
    live = [json.loads(line)["live_workers"]
            for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert summary["steps_done"] == 300 and summary["preemptions"] >= 1
    assert min(live) < 4 and live[0] == 4
    assert summary["test_acc"] > 0.8
    # Periodic checkpoints are off: the ones before the last step were taken at notices.
    steps = CheckpointStore(os.path.join(summary["run_dir"], "checkpoints")).steps()
    assert steps[-1] == 300 and len(steps) >= 2, steps


def test_a_booting_replacement_is_billed_but_does_not_hold_the_loop(make_config):
    """Adding a Ray node takes its caller ~1 s: the simulated pool adds nodes on a helper thread,
    so poll() returns while a replacement boots (billed from its launch) and hands it over once
    its node is up. The helper is held busy here so that the boot cannot finish early."""
    import threading

    from cloud.simulated import SimulatedPool

    cfg = make_config("cloud=simulated", "workers=1", "cloud.replace_delay_s=0")
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))
    try:
        (first,) = pool.start(1)
        assert first.node is not None  # the first machines are waited for
        hold = threading.Event()
        pool._node_starter.submit(hold.wait, 60)
        pool.reclaim([first])
        booting = pool.poll(1)
        assert booting.joined == [] and len(pool.alive) == 1  # launched, billed, not ready
        (machine,) = pool.alive.values()
        assert machine.id != first.id and machine.node is None
        cost = pool.costs()[0]
        hold.set()
        joined: list = []
        for step in range(2, 10_000):  # until the node is up (~1 s)
            joined = pool.poll(step).joined
            if joined:
                break
            threading.Event().wait(0.01)
        assert joined == [machine] and machine.node is not None
        assert pool.costs()[0] > cost  # billed all along
    finally:
        pool.shutdown()


def test_a_warm_standby_becomes_the_replacement_node_and_worker(make_config):
    """cloud.warm_nodes=1: a Ray node waits beside the worker's, billed at the spot price, with
    a standby actor on it (process started, imports done). A replacement takes that very node
    in the poll that launches it and that very actor, which then loads its shard and computes
    the same gradient as a freshly built worker; another standby node is started."""
    import time

    import numpy as np
    import ray
    import torch

    from cloud.simulated import WORKER_RESOURCE, SimulatedPool
    from orchestrator.run import make_step
    from orchestrator.workers import Worker, WorkerPool
    from orchestrator.workload import DataInfo, resolve_workload

    cfg = make_config("cloud=simulated", "workers=1", "model=mlp", "cloud.replace_delay_s=0",
                      "cloud.warm_nodes=1", "cloud.spot_price=3600",  # $1 a second
                      "worker.plane=driver")  # the gradient of one worker, compared below
    workload, info = resolve_workload(cfg), DataInfo((1, 8, 8), 10)
    training = make_step(cfg, workload.model(info))
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))

    def worker_nodes(wanted: set[str]) -> set[str]:
        """The alive worker nodes, once they are `wanted` (a node registers after add_node
        returns) or after 60 s."""
        deadline = time.monotonic() + 60
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"] and WORKER_RESOURCE in
                     n["Resources"]}
            if alive == wanted or time.monotonic() > deadline:
                return alive
            time.sleep(0.05)

    try:
        (first,) = pool.start(1)
        workers = WorkerPool(cfg, workload, info, pool, training)
        workers.start([first])
        (standby_future,) = pool._warm
        standby = standby_future.result(timeout=60)
        wanted = {first.node.node_id, standby.node_id}
        assert worker_nodes(wanted) == wanted
        c0, t0 = pool.costs()[0], time.monotonic()
        time.sleep(0.5)
        c1, t1 = pool.costs()[0], time.monotonic()
        assert (c1 - c0) / (t1 - t0) == pytest.approx(2.0, rel=0.05)  # machine + standby
        _drive(pool, workers, 1)
        standby_pid, error = ray.get(workers.standby[standby.node_id].ready.remote())
        assert error == ""
        workers.live.clear()  # the step-1 reclaim, as WorkerPool.call does it
        pool.reclaim([first])
        (machine,) = pool.poll(2).joined  # at once: the standby node was up
        assert machine.node.node_id == standby.node_id
        workers.add(machine)
        deadline = time.monotonic() + 60
        while not workers.live and time.monotonic() < deadline:
            workers.admit(2)
            time.sleep(0.02)
        assert [m for _, m in workers.live.values()] == [machine]
        assert machine.worker_pid == standby_pid  # the standby actor became the worker
        state = training.flat.numpy()
        (result,), lost = workers.gradients(ray.put(state), 2, [])
        threads = torch.get_num_threads()
        fresh = Worker(0, workload, cfg, info, "cpu").gradient(state, 2)
        torch.set_num_threads(threads)  # the in-process worker set this process's
        assert lost == 0 and np.array_equal(result.grad, fresh.grad)
        (next_standby,) = pool._warm
        assert next_standby is not standby_future
        wanted = {standby.node_id, next_standby.result(timeout=60).node_id}
        assert worker_nodes(wanted) == wanted
        workers.stop()
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------- one clock: steps
def test_replace_delay_steps_is_checked_with_the_preemption_model():
    cfg = load_config(["cloud=simulated", "cloud.preempt_prob=0.1", "cloud.replace_delay_steps=5"])
    assert cfg.cloud.replace_delay_steps == 5
    assert load_config(["cloud=simulated"]).cloud.replace_delay_steps == -1  # off by default
    with pytest.raises(ConfigError, match="cloud.replace_delay_steps=-2: must be >= -1"):
        load_config(["cloud=simulated", "cloud.replace_delay_steps=-2"])
    with pytest.raises(ConfigError, match="with cloud.trace use cloud.replace_delay_s"):
        load_config(["cloud=simulated", "cloud.trace=x.csv", "cloud.replace_delay_steps=0"])


# ------------------------------------------------------------------ one clock: the wall clock
def test_reclaim_probability_is_the_poisson_chance_of_a_reclaim_within_the_interval():
    from cloud.simulated import reclaim_probability

    assert reclaim_probability(0, 100) == 0 and reclaim_probability(5, 0) == 0
    assert reclaim_probability(3600, 1) == pytest.approx(1 - math.exp(-1), rel=1e-12)
    # two intervals survived in a row are one interval twice as long
    assert (1 - reclaim_probability(7, 30)) ** 2 == pytest.approx(1 - reclaim_probability(7, 60))


@pytest.mark.parametrize("time_scale", [1.0, 4.0])
def test_reclaims_per_hour_draws_at_the_rate_over_pool_time(time_scale):
    """In-process: 20 working spot machines polled every 0.5 s of wall time for 2000 polls at
    90 reclaims per hour of pool time; the count reclaimed is the rate's, within 4 sigma, and
    does not depend on how often the loop polls (steps are not the clock)."""
    from cloud.pool import Machine
    from cloud.simulated import SimulatedPool

    cfg = load_config(["cloud=simulated", "cloud.reclaims_per_hour=90",
                       f"cloud.time_scale={time_scale}", "workers=20"])
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))
    pool.alive = {i: Machine(id=i, market="spot", joined_at=0.0, worker_pid=1) for i in range(20)}
    polls, gap = 2000, 0.5
    taken = sum(len(pool._doomed(step, step * gap)) for step in range(polls + 1))
    q = 1 - math.exp(-90 * gap * time_scale / 3600)
    expected, sigma = 20 * polls * q, math.sqrt(20 * polls * q * (1 - q))
    assert abs(taken - expected) < 4 * sigma, (taken, expected)


def _bare_worker_pool(alive: dict):
    """A WorkerPool without Ray: only what admit() reads (no worker is starting)."""
    from types import SimpleNamespace

    from orchestrator.workers import WorkerPool

    wp = WorkerPool.__new__(WorkerPool)
    wp.cfg = SimpleNamespace(workers=2)
    wp.pool = SimpleNamespace(alive=alive, delay_steps=3, standby_nodes=dict)  # none kept
    wp.live, wp.starting, wp.idle, wp.booted, wp.ready_at, wp.join_log = {}, {}, [], {}, {}, []
    wp.standby, wp.held_s, wp.given_up = {}, 0.0, 0
    return wp


def test_admit_holds_a_ready_worker_until_its_step_and_counts_lateness():
    import time

    from cloud.pool import Machine

    now = time.monotonic()
    early = Machine(1, "spot", now - 5.0, ready_step=7)  # ready before its step
    late = Machine(2, "spot", now - 9.0, ready_step=3, due_at=now - 2.0)  # ready after it
    wp = _bare_worker_pool({1: early, 2: late})
    wp.booted = {0: ("actor0", early)}
    wp.ready_at = {1: now - 1.0}
    assert wp.admit(5) == 0 and wp.admit(6) == 0 and 0 in wp.booted and not wp.live
    assert wp.admit(7) == 1 and wp.live == {0: ("actor0", early)} and not wp.booted
    wp.booted = {1: ("actor1", late)}
    wp.ready_at = {2: now}
    assert wp.admit(6) == 1  # its step was 3: it takes part 3 steps late
    (lat0, steps0, s0), (lat1, steps1, s1) = wp.join_log
    assert (steps0, s0) == (0, 0.0) and lat0 == pytest.approx(4.0)
    assert steps1 == 3 and s1 == pytest.approx(2.0) and lat1 == pytest.approx(9.0)
    summary = wp.join_summary()
    assert summary["joins_late"] == 1 and summary["join_late_steps_mean"] == 1.5
    assert summary["join_late_s_mean"] == pytest.approx(1.0)
    assert summary["join_latency_s_mean"] == pytest.approx(6.5)
    # without a step (the first workers, cloud=local) a ready worker joins at once, uncounted
    other = Machine(3, "spot", now, ready_step=100)
    wp.pool.alive[3] = other
    wp.booted = {0: ("actor3", other)}
    assert wp.admit() == 1 and len(wp.join_log) == 2


def test_the_step_clock_gives_up_on_a_replacement_after_join_wait_s():
    """A replacement that never comes holds one step for join_wait_s, not every step after;
    one due later is waited for again."""
    import time

    wp = _bare_worker_pool({})
    due = [3]
    wp.pool.join_wait_s = 0.3
    wp.pool.due_steps = lambda: list(due)
    wp.pool.arrivals = list  # nothing ever arrives
    assert wp.wait_for_due(2) == 0 and wp.held_s < 0.1  # not due yet
    t = time.monotonic()
    assert wp.wait_for_due(3) == 0 and time.monotonic() - t >= 0.3
    t = time.monotonic()
    wp.wait_for_due(4)
    assert time.monotonic() - t < 0.1  # given up on: it joins late when it comes
    due.append(6)
    t = time.monotonic()
    wp.wait_for_due(6)
    assert time.monotonic() - t >= 0.3 and wp.held_s >= 0.6


def _drive(pool, workers, step: int) -> None:
    """What the run frame does before a step: poll, hand joined machines over, admit."""
    for machine in pool.poll(step).joined:
        workers.add(machine)
    workers.admit(step)


def test_a_replacement_takes_part_exactly_d_steps_after_the_reclaim(make_config):
    """cloud.replace_delay_steps=d on a real simulated pool: a worker reclaimed in step s is
    replaced at once (node and worker) and takes part from step s + d + 1, the planner's
    slot_availability(q, steps, wait=d, start=0) convention, even though it is ready before;
    one that is not ready by then joins when it is, and its lateness is counted. The steps
    here wait for the boot (seconds on a small machine), as slow training steps would."""
    import time

    from cloud.simulated import SimulatedPool
    from orchestrator.planner import slot_availability
    from orchestrator.run import make_step
    from orchestrator.workers import WorkerPool
    from orchestrator.workload import DataInfo, resolve_workload

    d = 3
    cfg = make_config("cloud=simulated", "workers=1", "model=mlp",
                      f"cloud.replace_delay_steps={d}")
    # the model's convention: the share q of slots reclaimed in step 1 works again in step
    # 1 + d + 1 (index d + 1), not before
    q = 0.1
    working = slot_availability(q, d + 3, wait=d, start=0)[0] / (1 - q)
    assert working[d] == pytest.approx((1 - q) ** d)
    assert working[d + 1] == pytest.approx((1 - q) ** (d + 1) + q)
    workload, info = resolve_workload(cfg), DataInfo((1, 8, 8), 10)
    training = make_step(cfg, workload.model(info))
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))
    try:
        machines = pool.start(1)
        workers = WorkerPool(cfg, workload, info, pool, training)
        workers.start(machines)
        (_, first), = workers.live.values()
        _drive(pool, workers, 1)
        workers.live.clear()  # the step-1 reclaim, as WorkerPool.call does it
        pool.reclaim([first])
        deadline = time.monotonic() + 60
        _drive(pool, workers, 2)
        while not workers.booted and time.monotonic() < deadline:  # step 2 lasts the boot
            time.sleep(0.05)
            _drive(pool, workers, 2)
        (_, machine), = workers.booted.values()
        assert machine.ready_step == 1 + d + 1 and not workers.live  # ready, held back
        for step in range(3, 1 + d + 1):
            _drive(pool, workers, step)
            assert not workers.live, step
        _drive(pool, workers, 1 + d + 1)
        assert [m for _, m in workers.live.values()] == [machine]
        assert workers.join_log[-1][1:] == (0, 0.0)
        # a boot longer than d steps: d=0 and the next step comes at once
        pool.cloud.replace_delay_steps = 0
        workers.live.clear()
        pool.reclaim([machine])
        step = 1 + d + 2
        _drive(pool, workers, step)
        while not workers.live and time.monotonic() < deadline:
            time.sleep(0.05)
            step += 1
            _drive(pool, workers, step)
        (_, replacement), = workers.live.values()
        assert replacement.ready_step == 1 + d + 2 and step > replacement.ready_step
        assert workers.join_log[-1][1] == step - replacement.ready_step
        assert workers.join_log[-1][2] > 0
        summary = workers.join_summary()
        assert summary["joins_late"] == 1 and summary["join_latency_s_mean"] > 0
        workers.stop()
    finally:
        pool.shutdown()


def test_the_step_clock_waits_for_replacements_so_live_workers_follow_the_model(make_config):
    """cloud.replace_delay_steps=d with the clock held (cloud.join_wait_s): every step's live
    workers are exactly the model's played on the pool's own draws, although each replacement
    boots for seconds while a step takes milliseconds; the waits show in clock_held_s. With
    seed 18 the first replacement is reclaimed in its very first step: it must be up (and
    drawn) by then."""
    q, d, steps, seed = 0.05, 2, 40, 18
    expected = replay_live_workers(seed, q, d, 2, steps)
    assert expected[6:14] == [2, 1, 1, 1, 1, 1, 1, 2]  # lost in 8, its replacement in 11
    summary = train(make_config("cloud=simulated", "workers=2", "model=mlp", f"steps={steps}",
                                f"seed={seed}", f"cloud.preempt_prob={q}",
                                f"cloud.replace_delay_steps={d}", "run.name=held",
                                "checkpoint.every_steps=0"))
    live = [json.loads(line)["live_workers"]
            for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert live == expected
    assert summary["preemptions"] == 2 and summary["joins"] == 2
    assert summary["joins_late"] == 0
    assert summary["clock_held_s"] > 0.5  # a boot is seconds; d steps of mlp are not
    saved = json.load(open(os.path.join(summary["run_dir"], "summary.json")))
    assert saved["clock_held_s"] == summary["clock_held_s"]


def test_the_device_is_decided_per_machine_from_its_gpus(make_config):
    """A pool that knows a machine's GPUs (a simulated node declaring one; an EC2 instance's
    Ray node once it joined) decides the worker's device on that machine, not from the
    cluster as it was at launch (no GPU yet)."""
    import ray

    from cloud.simulated import SimulatedPool
    from orchestrator.workers import worker_device

    cfg = make_config("cloud=simulated", "workers=1", "cloud.node_gpus=1")
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))
    try:
        machine, = pool.start(1)
        assert pool.machine_gpus(machine) == 1
        gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        assert len(gpu_nodes) == 1 and machine.node.node_id == gpu_nodes[0]["NodeID"]
        assert worker_device(cfg, pool.machine_gpus(machine)) == ("cuda", 1.0)
    finally:
        pool.shutdown()
    cpu_only = make_config("worker.device=cpu")
    assert worker_device(cpu_only, 1.0) == ("cpu", 0.0)
    assert worker_device(make_config(), 0.0) == ("cpu", 0.0)
    with pytest.raises(ConfigError, match="worker.device=cuda: its machine has no GPU"):
        worker_device(make_config("worker.device=cuda"), 0.0)
