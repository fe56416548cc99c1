"""The collective plane (orchestrator/collective.py) on a real local Ray cluster: the same
arithmetic as the driver plane, and membership changes without restarting the survivors."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import pytest
import ray
import torch

from cloud import make_pool
from orchestrator.collective import CollectivePlane, ring_bytes
from orchestrator.config import job_spec
from orchestrator.run import start_workers, train
from orchestrator.step import TooFewWorkers
from orchestrator.workload import data_info, resolve_workload

pytestmark = pytest.mark.usefixtures("ray_session")

# BatchNorm statistics, momentum, clipping, warm-up and a step schedule: every part of the
# update the driver plane makes
JOB = ["model.target=tests.workloads:bn_mlp", "optim.momentum=0.9", "optim.clip_norm=0.5",
       "optim.warmup_steps=3", "optim.schedule=step", "optim.step_size=5", "steps=12"]


def final_model(make_config, *overrides: str) -> dict[str, torch.Tensor]:
    summary = train(make_config(*JOB, *overrides))
    return torch.load(os.path.join(summary["run_dir"], "model.pt"), weights_only=True)


@pytest.mark.parametrize("workers, exact", [(2, True), (3, False)])
def test_the_collective_plane_makes_the_driver_planes_update(make_config, workers, exact):
    """2 workers: bit for bit (a + b is the same sum in any order); 3: to 1e-6 relative (the
    all-reduce adds in another order than the driver's mean)."""
    driver = final_model(make_config, f"workers={workers}", "worker.plane=driver",
                         f"run.name=driver{workers}")
    collective = final_model(make_config, f"workers={workers}", "worker.plane=collective",
                             f"run.name=collective{workers}", "worker.steps_per_call=5")
    assert driver.keys() == collective.keys()
    for name, value in driver.items():
        if name.endswith("num_batches_tracked"):  # the driver's copy never runs a forward
            assert int(collective[name]) == 12 and int(value) == 0
        elif exact:
            assert torch.equal(collective[name], value), name
        else:
            torch.testing.assert_close(collective[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("job", [
    ["strategy=median", "byzantine.f=1", "byzantine.attack=sign_flip"],
    ["strategy=trimmed_mean", "byzantine.f=1", "byzantine.attack=alie", "strategy.pre=[bucketing]",
     "strategy.bucket_size=1"],
    ["strategy=mean", "byzantine.f=1", "byzantine.attack=ipm"],
    ["strategy=median", "byzantine.f=2", "byzantine.attack=nan"],
    ["strategy=median", "byzantine.f=1", "byzantine.attack=label_flip", "strategy.noise=0.01"],
    ["strategy=krum", "byzantine.f=1", "byzantine.attack=bulyan_coord"],
    ["strategy=multi_krum", "byzantine.f=1", "byzantine.attack=alie", "strategy.pre=[nnm]"],
    ["strategy=geomed", "byzantine.f=2", "byzantine.attack=ipm"],
    ["strategy=centered_clip", "byzantine.f=1", "byzantine.attack=alie", "strategy.tau=0.05"],
    ["strategy=sign_vote", "byzantine.f=1", "byzantine.attack=alie", "strategy.noise=0.01"],
], ids=["median-sign_flip", "trimmed_mean-alie-bucketing", "mean-ipm", "median-nan",
        "median-label_flip-noise", "krum-bulyan_coord", "multi_krum-alie-nnm",
        "geomed-ipm", "centered_clip-alie", "sign_vote-alie-noise"])
def test_robust_rules_sharded_by_blocks_match_the_driver_plane(make_config, job):
    """The rule, the attack forged per block, the finite check agreed over the blocks, the
    pre-aggregation and the workers' noise: the same model as the driver plane's (each
    block sees what the driver sees of those coordinates: bit for bit for the order
    statistics; to 1e-6 relative for the mean, which torch sums in another order over a
    block than over the whole row, and for the rules whose weights come from a Gram matrix
    summed over the blocks), and the same counts of rejected gradients. centered_clip's
    state, the previous aggregate, goes into each step as the member's block and comes back
    whole."""
    common = ["workers=5", "model=mlp", "steps=15", *job]
    driver = train(make_config(*common, "worker.plane=driver", "run.name=driver"))
    collective = train(make_config(*common, "worker.plane=collective", "run.name=collective",
                                   "worker.steps_per_call=4"))
    for key in ("rejected_updates", "skipped_steps", "byzantine_ranks"):
        assert collective[key] == driver[key], key
    assert collective["plane"] == "collective"
    a, b = (torch.load(os.path.join(s["run_dir"], "model.pt"), weights_only=True)
            for s in (driver, collective))
    exact = job[0] in ("strategy=median", "strategy=trimmed_mean", "strategy=sign_vote")
    # bytes: the gradient's exchange and the finite flags, plus what the rule sums or
    # gathers over the blocks (a 5 x 5 float64 Gram matrix at least, for the distance rules)
    d = sum(v.numel() for v in a.values() if v.is_floating_point())
    flags = ring_bytes(5, 4 * 5)
    extra = collective["bytes_up"] - 15 * (ring_bytes(5, 4 * d) + flags)
    if job[0] == "strategy=sign_vote":  # 1 bit per value out, float32 back, in blocks of
        width = math.ceil(math.ceil(d / 5) / 8) * 8  # ceil(d / 5) values, in whole bytes
        assert collective["bytes_up"] == 15 * (5 * 4 * (width // 8 + 4 * width) + flags)
    elif job[0] in ("strategy=median", "strategy=trimmed_mean", "strategy=mean"):
        assert extra == 0
    else:
        assert extra >= 15 * ring_bytes(5, 8 * 5 * 5)
    for name, value in a.items():
        if exact:
            assert torch.equal(b[name], value), name
        else:
            torch.testing.assert_close(b[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("workers, job", [
    (2, []),
    (3, ["strategy=median", "byzantine.f=1", "byzantine.attack=sign_flip"]),  # n >= 2f+1
], ids=["mean", "median"])
def test_on_gpus_the_collective_plane_makes_the_driver_planes_update(make_config, workers, job):
    """NCCL where every worker has a GPU of its own, gloo through host copies where they
    share one: the driver plane's model either way (to float tolerance: GPU kernels)."""
    common = [f"workers={workers}", "model=mlp", "steps=10", "worker.device=cuda", *job]
    driver = train(make_config(*common, "worker.plane=driver", "run.name=driver"))
    collective = train(make_config(*common, "worker.plane=collective", "run.name=collective"))
    own_gpus = torch.cuda.device_count() >= workers
    assert collective["backend"] == ("nccl" if own_gpus else "gloo")
    a, b = (torch.load(os.path.join(s["run_dir"], "model.pt"), weights_only=True)
            for s in (driver, collective))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-6)


def start(make_config, workers: int, *overrides: str):
    cfg = make_config(f"workers={workers}", "model=mlp", *overrides)
    workload = resolve_workload(cfg)
    info = data_info(workload.dataset("test"))
    torch.manual_seed(cfg.seed)
    plane = CollectivePlane(cfg, workload.model(info))
    pool = make_pool(cfg.cloud, job_spec(cfg))
    return plane, pool, start_workers(cfg, pool, workload, info, plane)


def states(workers, ranks: list[int] | None = None) -> dict[int, dict]:
    return {rank: ray.get(actor.export.remote()) for rank, (actor, _) in workers.live.items()
            if ranks is None or rank in ranks}


def assert_equal_replicas(workers) -> None:
    by_rank = list(states(workers).values())
    for other in by_rank[1:]:
        for name, value in by_rank[0]["model"].items():
            assert torch.equal(other["model"][name], value), name


def test_members_lost_between_and_during_calls_and_a_joiner(make_config):
    """A worker SIGKILLed between calls, one SIGKILLed while a call runs, and a replacement
    that joins: the survivors keep their processes, every step is done once, and all members
    hold the same model afterwards (the joiner gets it from a survivor)."""
    plane, pool, workers = start(make_config, 4)
    try:
        pids = {rank: m.worker_pid for rank, (_, m) in workers.live.items()}
        assert len(plane.run(range(1, 5), workers, [])) == 4
        assert plane.groups == 1

        os.kill(pids[3], signal.SIGKILL)  # between calls: the next call's all-reduce fails
        time.sleep(0.5)
        outcomes = plane.run(range(5, 9), workers, [])
        assert [o.answered for o in outcomes] == [3] * 4 and outcomes[0].lost == 1
        assert sorted(workers.live) == [0, 1, 2] and plane.groups == 2
        assert {r: m.worker_pid for r, (_, m) in workers.live.items()} == \
            {r: pids[r] for r in (0, 1, 2)}  # no survivor restarted
        assert_equal_replicas(workers)

        timer = threading.Timer(0.3, os.kill, (pids[2], signal.SIGKILL))
        timer.start()  # during a call of 400 steps: it comes back cut short
        step, lost = 9, 0
        while step < 409:
            outcomes = plane.run(range(step, 409), workers, [])
            lost += sum(o.lost for o in outcomes)
            step += len(outcomes)
        timer.join()
        assert lost == 1 and sorted(workers.live) == [0, 1] and step == 409
        assert_equal_replicas(workers)

        deadline = time.time() + 60  # the pool asked for replacements: one joins
        while len(workers.live) < 3 and time.time() < deadline:
            for machine in pool.poll(409).joined:
                workers.add(machine)
            workers.admit()
            time.sleep(0.1)
        assert len(workers.live) >= 3
        outcomes = plane.run(range(409, 411), workers, [])
        assert outcomes[0].answered == len(workers.live)
        assert outcomes[0].bytes_down > outcomes[1].bytes_down  # the joiner's state went down
        assert_equal_replicas(workers)
    finally:
        workers.stop()
        pool.shutdown()


def test_a_hung_member_is_dropped_in_a_call_and_in_a_group_formation(make_config):
    """A member stopped (SIGSTOP) before a call: the others' all-reduce times out after
    worker.step_timeout_s, the driver drops the silent one and the survivors redo the
    steps. A member stopped before a group formation (a reclaim makes the group re-form):
    the others' rendezvous times out, the driver drops only the silent one and forms the
    group again. Each costs a few step timeouts, and the survivors keep their processes."""
    plane, pool, workers = start(make_config, 5, "worker.step_timeout_s=2")
    stopped: list[int] = []
    try:
        pids = {rank: m.worker_pid for rank, (_, m) in workers.live.items()}
        assert len(plane.run(range(1, 3), workers, [])) == 2

        stopped.append(pids[4])
        os.kill(pids[4], signal.SIGSTOP)  # in a call
        started, step, lost = time.monotonic(), 3, 0
        while step < 7:
            outcomes = plane.run(range(step, 7), workers, [])
            lost += sum(o.lost for o in outcomes)
            step += len(outcomes)
        assert lost == 1 and sorted(workers.live) == [0, 1, 2, 3]
        assert time.monotonic() - started < 8 * 2  # a few step timeouts, not a hang
        assert plane.groups == 2
        assert_equal_replicas(workers)

        stopped.append(pids[2])
        os.kill(pids[2], signal.SIGSTOP)  # in the group formation the reclaim causes
        started = time.monotonic()
        outcomes = plane.run(range(7, 9), workers, [workers.live[3][1]])
        assert sum(o.lost for o in outcomes) == 2  # the reclaimed one and the hung one
        assert sorted(workers.live) == [0, 1] and len(outcomes) == 2
        assert all(o.answered == 2 for o in outcomes)
        assert time.monotonic() - started < 8 * 2
        assert plane.groups == 4  # the try that timed out, then the one without it
        assert {r: m.worker_pid for r, (_, m) in workers.live.items()} == \
            {r: pids[r] for r in (0, 1)}
        assert_equal_replicas(workers)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        workers.stop()
        pool.shutdown()


def test_a_replacement_of_the_same_rank_gets_a_group_of_its_own(make_config):
    """Every member reclaimed at once, then a replacement takes the same rank: the set of
    ranks is what it was, but the process is new and must enter a new group (a check by
    ranks alone ran it without one)."""
    plane, pool, workers = start(make_config, 1)
    try:
        assert len(plane.run(range(1, 3), workers, [])) == 2
        outcomes = plane.run(range(3, 4), workers, [workers.live[0][1]])
        assert outcomes[0].answered == 0 and not workers.live
        deadline = time.time() + 60
        while not workers.live and time.time() < deadline:
            for machine in pool.poll(3).joined:
                workers.add(machine)
            workers.admit()
            time.sleep(0.1)
        assert sorted(workers.live) == [0]
        outcomes = plane.run(range(3, 6), workers, [])
        assert [o.answered for o in outcomes] == [1, 1, 1] and plane.groups == 2
    finally:
        workers.stop()
        pool.shutdown()


def test_a_pulled_state_is_what_the_members_hold(make_config):
    """eval_model / state_dict pull the newest state into the driver's copy, in the driver
    plane's checkpoint layout."""
    plane, pool, workers = start(make_config, 2)
    try:
        plane.run(range(1, 7), workers, [])
        state = plane.state_dict(workers)
        assert set(state) == {"model", "optimizer", "aggregation", "rejected"}
        held = next(iter(states(workers).values()))
        for name, value in held["model"].items():
            assert torch.equal(state["model"][name], value), name
        assert state["optimizer"]["state"]  # momentum buffers came along
    finally:
        workers.stop()
        pool.shutdown()


def test_a_stop_during_a_call_finishes_its_steps_before_the_checkpoint(make_config):
    """settle(): the steps in flight when a stop came are finished and reported, so the
    checkpoint's step and model agree."""
    plane, pool, workers = start(make_config, 2)
    try:
        plane.run(range(1, 2), workers, [])  # the group forms
        plane.in_flight = (range(2, 32), workers.submit("run_steps", (2, 32)))
        settled = plane.settle(workers)
        assert [step for step, _ in settled] == list(range(2, 32))
        assert all(o.answered == 2 and o.updated for _, o in settled)
        assert plane.in_flight is None and plane.settle(workers) == []
    finally:
        workers.stop()
        pool.shutdown()


@pytest.mark.parametrize("on_too_few", ["skip", "fail"])
def test_too_few_members_for_the_rule_skip_or_stop_the_steps(make_config, on_too_few):
    """median with f = 1 needs 3 rows: after a member is lost, the 2 left skip every step
    (the model stays where it was) or, with strategy.on_too_few=fail, stop the run."""
    plane, pool, workers = start(make_config, 3, "strategy=median", "strategy.f=1",
                                 "worker.plane=collective", f"strategy.on_too_few={on_too_few}")
    try:
        assert all(o.updated for o in plane.run(range(1, 4), workers, []))
        before = states(workers, [0, 1])
        os.kill(workers.live[2][1].worker_pid, signal.SIGKILL)
        time.sleep(0.5)
        if on_too_few == "fail":
            with pytest.raises(TooFewWorkers, match="strategy.on_too_few=fail"):
                plane.run(range(4, 7), workers, [])
            return
        outcomes = plane.run(range(4, 7), workers, [])
        assert [(o.answered, o.updated) for o in outcomes] == [(2, False)] * 3
        for rank, state in states(workers).items():
            for name, value in state["model"].items():
                assert torch.equal(value, before[rank]["model"][name]), name
    finally:
        workers.stop()
        pool.shutdown()
