"""Goodput under preemption on equal work: squall elastic vs Ray Train (fixed-size
checkpoint-restart, and elastic) vs torchft (per-step fault tolerance), one schedule of
machine losses and joins per seed, applied to every side the same way.

    python -m benchmarks.goodput [--seeds 5] [--trace-seeds 3] [--budget 48000]
                                 [--target 0.97] [--schedules poisson trace] [--sides ...]
                                 [--rate 90] [--delay 3] [--quick]

Equal work: the same model (squall's CNN on its offline digits data), the same initial
weights, shards and per-step batches (orchestrator.data.shard_of / batch_indices by worker
slot and step), batch 32 per worker, SGD (lr, momentum 0.9), and the same sample budget: a
side stops when its surviving updates have consumed --budget samples (a step with k live
workers counts k x 32). Every side evaluates on the digits test split every --eval-every
steps; time to target is the first evaluation at or above --target.

The schedule of a seed (drawn once, `Outage`: slot, down, up, in seconds after the side's
first training step) is applied by the harness, never by the side: at `down` the machine of
worker slot `slot` dies (its Ray node removed with the worker's process SIGKILLed, or the
torchft replica's process SIGKILLed) at whatever point of a step it is, and a new machine for
that slot joins at `up`. Each side then does what it does: squall continues with the workers
left and admits a worker on the new machine; Ray Train fixed-size restarts its worker group
from its latest checkpoint once 2 nodes exist again; Ray Train elastic restarts with the
workers it can place and restarts again to grow when a node joins (a fit() that ends in a
ControllerError, a node lost while workers start, is called again on the same run: it
resumes from the latest checkpoint); torchft's
survivor keeps stepping and the relaunched replica heals from it.

- poisson: each slot fails at a Poisson rate (--rate per wall hour) while up; its machine
  is back --delay s later.
- trace: each slot is a spot machine in its own zone, priced by a synthetic trace
  (cloud.traces.synthetic_trace, one seed per zone) compressed --time-scale x; it dies when
  the price passes --bid and is back --delay s later, once the price is at or below the
  bid again.

Dollars: every slot's machine is billed while it is up (from the side's launch, start-up
included, to the end of its work): the flat --price ($/h) with poisson, the zone's trace
price with trace; the same machines for every side, so dollars follow how long each side
holds them. Each side runs in a process of its own (a fresh Ray cluster or lighthouse),
sides in rotated order per seed; writes one generated part of benchmarks/goodput.md per
schedule run (`<!-- schedule:NAME -->`; the other schedule's part and the reading notes are
kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

MD = Path(__file__).with_suffix(".md")
TITLE = "Goodput under preemption: squall vs Ray Train vs torchft"
SIDES = ["squall", "ray_fixed", "ray_elastic", "torchft"]
LABELS = {"squall": "squall elastic", "ray_fixed": "Ray Train fixed-size (checkpoint-restart)",
          "ray_elastic": "Ray Train elastic (num_workers=(1, 2))",
          "torchft": "torchft (gloo, heal from a peer)"}
PEERS = SIDES[1:]
MAX_REFITS = 20  # Ray Train: fit() again after a ControllerError (an outer retry loop)


# --------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class Work:
    """What every side trains, and how long."""

    workers: int = 2
    batch: int = 32  # per worker
    lr: float = 0.01
    width: int = 64  # the CNN's model.args
    hidden: int = 256
    budget: int = 48_000  # samples in surviving updates
    target: float = 0.97  # test accuracy
    eval_every: int = 25  # steps
    ckpt_every: int = 50  # steps: Ray Train's checkpoints, torchft's durable copy
    seed: int = 0

    def overrides(self) -> list[str]:
        """The squall configuration of this work (every side resolves its workload from it)."""
        return ["strategy=mean", "model=cnn", "data=digits", f"workers={self.workers}",
                f"seed={self.seed}", f"data.batch_size={self.batch}", f"optim.lr={self.lr}",
                "optim.momentum=0.9", f"model.args.width={self.width}",
                f"model.args.hidden={self.hidden}"]


# --------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Outage:
    slot: int
    down: float  # seconds after the first training step
    up: float  # the slot's new machine joins


@dataclass
class Schedule:
    name: str
    outages: list[Outage]
    price: float = 0.1  # $/h of every machine (poisson)
    zones: list = field(default_factory=list)  # per slot: (times, prices) in wall seconds

    def price_at(self, slot: int, t: float) -> float:
        """$/h of the slot's machine at t (seconds after the first step)."""
        if not self.zones:
            return self.price
        times, prices = self.zones[slot]
        i = max(0, _last_at_or_before(times, t))
        return prices[i]

    def up_at(self, slot: int, t: float) -> bool:
        return not any(o.slot == slot and o.down <= t < o.up for o in self.outages)

    def cost(self, workers: int, start: float, end: float, dt: float = 0.05) -> float:
        """Dollars of the slots' machines while up, from `start` (negative: the start-up
        before the first step) to `end`."""
        total, t = 0.0, start
        while t < end:
            step = min(dt, end - t)
            total += sum(self.price_at(s, t) * step for s in range(workers) if self.up_at(s, t))
            t += step
        return total / 3600

    def to_json(self) -> dict:
        return {"name": self.name, "outages": [asdict(o) for o in self.outages],
                "price": self.price, "zones": self.zones}

    @staticmethod
    def from_json(d: dict) -> Schedule:
        return Schedule(d["name"], [Outage(**o) for o in d["outages"]], d["price"], d["zones"])


def _last_at_or_before(times: list[float], t: float) -> int:
    lo, hi = 0, len(times)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def poisson_schedule(seed: int, workers: int, per_hour: float, delay: float,
                     horizon: float = 900.0, price: float = 0.1) -> Schedule:
    """Each slot fails at `per_hour` (a Poisson process over the time it is up); its new
    machine joins `delay` s later."""
    outages = []
    for slot in range(workers):
        rng = random.Random(f"goodput-poisson-{seed}-{slot}")
        t = 0.0
        while True:
            t += rng.expovariate(per_hour / 3600)
            if t > horizon:
                break
            outages.append(Outage(slot, round(t, 3), round(t + delay, 3)))
            t += delay
    return Schedule("poisson", sorted(outages, key=lambda o: o.down), price)


def trace_schedule(seed: int, workers: int, bid: float, time_scale: float, delay: float,
                   horizon: float = 900.0) -> Schedule:
    """Each slot a spot machine in a zone of its own (a synthetic trace per zone, compressed
    time_scale x): it dies when the price passes the bid and its new machine joins `delay` s
    later, once the price is back at or below the bid."""
    from cloud.traces import synthetic_trace

    hours = horizon * time_scale / 3600 + 1
    outages, zones = [], []
    for slot in range(workers):
        rows = synthetic_trace(hours=hours, seed=seed * 1000 + slot, zone=f"zone-{slot}")
        start = datetime.fromisoformat(rows[0]["Timestamp"])
        times = [(datetime.fromisoformat(r["Timestamp"]) - start).total_seconds() / time_scale
                 for r in rows]
        prices = [float(r["SpotPrice"]) for r in rows]
        zones.append((times, prices))
        outages += _trace_outages(slot, times, prices, bid, delay, horizon)
    return Schedule("trace", sorted(outages, key=lambda o: o.down), zones=zones)


def _trace_outages(slot: int, times: list[float], prices: list[float], bid: float,
                   delay: float, horizon: float) -> list[Outage]:
    outages, i = [], 0
    while i < len(times) and times[i] <= horizon:
        if prices[i] <= bid:
            i += 1
            continue
        down = max(times[i], 0.0)
        j = i
        while j < len(times) and (prices[j] > bid or times[j] < down + delay):
            j += 1
        up = max(down + delay, times[j] if j < len(times) else math.inf)
        outages.append(Outage(slot, round(down, 3), round(up, 3)))
        i = j
    return outages


# --------------------------------------------------------------------------- the harness
class Chaos(threading.Thread):
    """Applies the outages: kill(slot) at each down, join(slot) at each up, in seconds after
    t0() (time.time() of the first training step; None until there is one)."""

    def __init__(self, outages: list[Outage], t0: Callable[[], float | None],
                 kill: Callable[[int], bool], join: Callable[[int], None] | None) -> None:
        super().__init__(daemon=True)
        self.outages, self.t0, self.on_kill, self.on_join = outages, t0, kill, join
        self.done = threading.Event()
        self.applied: list[tuple[float, str, int]] = []  # (t, kill|join|missed, slot)

    def run(self) -> None:
        t0 = None
        while not self.done.is_set() and (t0 := self.t0()) is None:
            time.sleep(0.02)
        events = [(o.down, 0, o.slot) for o in self.outages]
        if self.on_join is not None:
            events += [(o.up, 1, o.slot) for o in self.outages]
        for t, kind, slot in sorted(events):
            if t0 is None or self.done.wait(max(0.0, t0 + t - time.time())):
                return
            try:
                if kind == 0:
                    what = "kill" if self.on_kill(slot) else "missed"
                else:
                    self.on_join(slot)
                    what = "join"
            except Exception as e:  # noqa: BLE001 (a side's failure to apply is recorded)
                what = f"error: {e}"
            self.applied.append((round(time.time() - t0, 3), what, slot))


class StepLog:
    """JSON lines shared by a side's processes: steps, evaluations, the first step's start."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, **record: object) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), **record}) + "\n")

    def read(self) -> list[dict]:
        try:
            with open(self.path) as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def first(self, kind: str) -> float | None:
        return next((r["t"] for r in self.read() if r["kind"] == kind), None)


def torch_setup(work: Work) -> tuple:
    """(workload, train split, test split, fresh model) of the work, as squall builds them."""
    import torch

    from orchestrator.config import load_config
    from orchestrator.workload import data_info, resolve_workload

    torch.set_num_threads(1)
    cfg = load_config(work.overrides())
    workload = resolve_workload(cfg)
    test_set = workload.dataset("test")
    torch.manual_seed(work.seed)
    return cfg, workload, workload.dataset("train"), test_set, workload.model(data_info(test_set))


def slot_batches(cfg: object, train_set: object, slot: int, slots: int) -> Callable:
    """batch(step): the mini-batch of `step` for worker slot `slot` of `slots`."""
    import torch

    from orchestrator.data import batch_indices, shard_of

    shard = torch.from_numpy(shard_of(train_set, slot, slots, cfg.data, cfg.seed))
    x, y = (t[shard] for t in train_set.tensors)

    def batch(step: int) -> tuple:
        idx = torch.from_numpy(batch_indices(len(y), cfg.data.batch_size, step, cfg.seed, slot))
        return x[idx], y[idx]
    return batch


# --------------------------------------------------------------------------- squall
def run_squall(work: Work, schedule: Schedule, tmp: str, delay: float) -> dict:
    """squall train cloud=simulated in this process, its pool replaced by one whose
    machines die on the schedule (from a thread, mid-step) and whose replacements join at
    the schedule's times; stopped (as Ctrl-C does) once the budget is consumed."""
    import orchestrator.run as squall_run
    from orchestrator.config import load_config

    name = "squall"
    cfg = load_config([*work.overrides(), "cloud=simulated", f"cloud.replace_delay_s={delay}",
                       f"steps={10 * work.budget // work.batch}",  # stopped at the budget
                       f"eval.every={work.eval_every}", "checkpoint.every_steps=0",
                       "log.progress=false", f"run.dir={tmp}", f"run.name={name}",
                       "worker.start_timeout_s=600"])
    pools: list = []
    metrics = os.path.join(tmp, name, "metrics.jsonl")

    def make_pool(cloud: object, job: object) -> object:
        pools.append(scheduled_pool(cloud, job, schedule, metrics, work))
        return pools[0]

    redone = [0]
    make_step = squall_run.make_step

    def counting_step(cfg: object, model: object) -> object:
        training = make_step(cfg, model)
        if hasattr(training, "_collect"):  # the collective plane: a call cut by a loss
            collect = training._collect

            def counted(workers: object) -> tuple:
                steps = training.in_flight[0]
                outcomes, lost = collect(workers)
                redone[0] += len(outcomes) < len(steps)
                return outcomes, lost
            training._collect = counted
        return training

    squall_run.make_pool, squall_run.make_step = make_pool, counting_step
    launch = time.time()
    summary = squall_run.train(cfg)
    pool = pools[0]
    pool.chaos.done.set()
    from orchestrator.metrics import read_metrics

    rows = read_metrics(summary["run_dir"])
    steps, samples = [], 0
    for r in rows:
        samples += r["live_workers"] * work.batch
        steps.append({"t": launch + r["wall_s"], "step": r["step"], "n": r["live_workers"],
                      "samples": samples, **({"acc": r["test_acc"]} if "test_acc" in r else {})})
    return {"launch": launch, "t0": pool.t0_wall, "steps": steps, "redone": redone[0],
            "applied": pool.chaos.applied,
            "notes": f"{summary['joins']} joins, live workers {summary['live_workers_mean']:.2f}"
                     f" per step on average, plane {summary.get('plane')}"}


def scheduled_pool(cloud: object, job: object, schedule: Schedule, metrics: str,
                   work: Work) -> object:
    """A SimulatedPool that draws no reclaims: a Chaos thread kills slots' machines behind
    the training loop's back, the loop finds the losses itself, and each replacement joins
    at its slot's scheduled time."""
    from cloud.simulated import SimulatedPool

    class ScheduledPool(SimulatedPool):
        def __init__(self) -> None:
            super().__init__(cloud, job)
            self.lock = threading.RLock()
            self.slot_of: dict[int, int] = {}  # machine id -> worker slot
            self.pending: list[tuple[float, int]] = []  # (ready_at monotonic, slot)
            self.t0_wall: float | None = None
            self.t0_mono = 0.0
            self.samples, self.read_at = 0, 0
            self.chaos = Chaos(schedule.outages, lambda: self.t0_wall, self.kill_slot, None)

        def _launch(self, markets: list[str]) -> list:
            machines = super()._launch(markets)
            for m in machines:
                self.pending.sort()
                self.slot_of[m.id] = (self.pending.pop(0)[1] if self.pending
                                      else len(self.slot_of))
            return machines

        def _doomed(self, step: int, now: float) -> list:
            if self.t0_wall is None:  # the first step: the schedule's clock starts
                self.t0_wall, self.t0_mono = time.time(), now
                self.chaos.start()
            return []

        def poll(self, step: int) -> object:
            if self._consumed() >= work.budget:
                raise KeyboardInterrupt  # the budget is done: stop as Ctrl-C does
            return super().poll(step)

        def _consumed(self) -> int:
            with contextlib.suppress(FileNotFoundError), open(metrics) as f:
                f.seek(self.read_at)
                for line in f:
                    if not line.endswith("\n"):
                        break
                    self.read_at += len(line)
                    self.samples += json.loads(line)["live_workers"] * work.batch
            return self.samples

        def reclaim(self, machines: list) -> None:
            for m in machines:
                self._reclaim(m)
                slot = self.slot_of.get(m.id, 0)
                now = time.monotonic() - self.t0_mono
                ups = [o.up for o in schedule.outages if o.slot == slot and o.down <= now + 0.5]
                ready = self.t0_mono + max(ups) if ups else time.monotonic() + self._replace_delay()
                self._requests.append((max(ready, time.monotonic()), m.market))
                self.pending.append((ready, slot))

        def kill_slot(self, slot: int) -> bool:
            with self.lock:
                machine = next((m for m in list(self.alive.values())
                                if self.slot_of.get(m.id) == slot), None)
                if machine is None:
                    return False
                self._remove(machine)
                return True

        def _remove(self, machine: object) -> None:
            with self.lock:
                if not getattr(machine, "gone", False):
                    machine.gone = True
                    super()._remove(machine)

        def shutdown(self) -> None:
            self.chaos.done.set()
            with self.lock:  # after a kill in flight: both would remove its node
                super().shutdown()

    return ScheduledPool()


# --------------------------------------------------------------------------- Ray Train
def ray_train_loop(config: dict) -> None:
    """One Ray Train worker: the work's model, its slot's shard and batches (slot = world
    rank; with fewer workers than slots, the shards of the smaller world), SGD under DDP;
    checkpoints (with the samples consumed) every ckpt_every steps; rank 0 logs."""
    import torch
    from ray import train as rt
    from ray.train.torch import prepare_model

    from orchestrator.optimizer import build_optimizer

    work, log = Work(**config["work"]), StepLog(config["log"])
    cfg, workload, train_set, test_set, model = torch_setup(work)
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch = slot_batches(cfg, train_set, rank, world)
    optimizer = build_optimizer(cfg.optim, list(model.parameters()))
    step, samples = 0, 0
    if (checkpoint := rt.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, samples = state["step"], state["samples"]
    ddp = prepare_model(model)
    if rank == 0 and log.first("start") is None:
        log.write(kind="start")
    while samples < work.budget:
        step += 1
        optimizer.zero_grad()
        workload.loss(ddp, batch(step)).backward()
        optimizer.step()
        samples += world * work.batch
        record = {"kind": "step", "step": step, "n": world, "samples": samples}
        if rank == 0 and step % work.eval_every == 0:
            record["acc"] = workload.evaluate(model, test_set, 1000)["test_acc"]
        if rank == 0:
            log.write(**record)
        if step % work.ckpt_every == 0 and samples < work.budget:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step, "samples": samples}, os.path.join(d, "state.pt"))
                    ckpt = rt.Checkpoint.from_directory(d)
                rt.report({"step": step}, checkpoint=ckpt)
    rt.report({"step": step})


def run_ray_train(work: Work, schedule: Schedule, tmp: str, elastic: bool,
                  monitor_s: float) -> dict:
    """A local multi-node cluster (head: 0 CPUs; one 1-CPU node per slot); the schedule
    removes and adds the slots' nodes; TorchTrainer with unlimited failures."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    launch = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0},
                      shutdown_at_exit=False)
    nodes = {slot: cluster.add_node(num_cpus=1) for slot in range(work.workers)}
    log = StepLog(os.path.join(tmp, "steps.jsonl"))

    def kill(slot: int) -> bool:
        node = nodes.pop(slot, None)
        if node is not None:
            cluster.remove_node(node, allow_graceful=False)
        return node is not None

    def join(slot: int) -> None:
        nodes[slot] = cluster.add_node(num_cpus=1, wait=False)  # it boots meanwhile

    chaos = Chaos(schedule.outages, lambda: log.first("start"), kill, join)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        chaos.start()
        workers = (1, work.workers) if elastic else work.workers
        scaling = ScalingConfig(num_workers=workers, use_gpu=False,
                                **({"elastic_resize_monitor_interval_s": monitor_s}
                                   if elastic else {}))
        run = RunConfig(name="rt", storage_path=os.path.join(tmp, "ray_train"),
                        failure_config=FailureConfig(max_failures=-1),
                        checkpoint_config=CheckpointConfig(num_to_keep=2))
        for refits in range(MAX_REFITS + 1):  # the same run again: its latest checkpoint
            try:
                TorchTrainer(ray_train_loop, scaling_config=scaling, run_config=run,
                             train_loop_config={"work": asdict(work), "log": log.path}).fit()
                break
            except ControllerError:  # a node lost while the controller (re)starts workers
                if refits == MAX_REFITS:
                    raise
    finally:
        chaos.done.set()
        ray.shutdown()
        cluster.shutdown()
    records = log.read()
    steps = [r for r in records if r["kind"] == "step"]
    return {"launch": launch, "t0": log.first("start"), "steps": steps,
            "redone": len(steps) - len({r["step"] for r in steps}), "applied": chaos.applied,
            "notes": f"{restarts(steps)} worker-group (re)starts after the first, "
                     f"fit() called {refits + 1}x"}


def restarts(steps: list[dict]) -> int:
    """Worker-group restarts seen in a step log: a step that does not follow the last."""
    return sum(b["step"] != a["step"] + 1 for a, b in zip(steps, steps[1:]))


# --------------------------------------------------------------------------- torchft
def torchft_replica(work: Work, slot: int, life: int, lighthouse: str, tmp: str) -> None:
    """One torchft replica group of one process: a Manager on the lighthouse, gloo among the
    replicas, the slot's shard; the replica of participating rank 0 evaluates and keeps a
    durable checkpoint (used only when no peer is left to heal from)."""
    import torch
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    from orchestrator.optimizer import build_optimizer

    cfg, workload, train_set, test_set, model = torch_setup(work)
    batch = slot_batches(cfg, train_set, slot, work.workers)
    optimizer = build_optimizer(cfg.optim, list(model.parameters()))
    log, durable = StepLog(os.path.join(tmp, "steps.jsonl")), os.path.join(tmp, "durable.pt")
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=1,
        load_state_dict=lambda s: (model.load_state_dict(s["model"]),
                                   optimizer.load_state_dict(s["optimizer"])),
        state_dict=lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        replica_id=f"slot{slot}-life{life}", lighthouse_addr=lighthouse, rank=0, world_size=1,
        store_addr="localhost", store_port=store.port, timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=120))
    if os.path.exists(durable):  # a peer that is further on heals this replica instead
        state = torch.load(durable, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        manager.load_state_dict(state["manager"])
    params = list(model.parameters())
    if log.first("start") is None:
        log.write(kind="start")
    while manager.batches_committed() * work.batch < work.budget:
        optimizer.zero_grad()
        manager.start_quorum()
        step = manager.current_step() + 1
        workload.loss(model, batch(step)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        manager.allreduce(flat).wait()
        torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        n = manager.num_participants()
        if not manager.should_commit():
            log.write(kind="failed", step=step, slot=slot)
            continue
        optimizer.step()
        if manager.participating_rank() != 0:
            continue
        record = {"kind": "step", "step": step, "n": n,
                  "samples": manager.batches_committed() * work.batch}
        if step % work.eval_every == 0:
            record["acc"] = workload.evaluate(model, test_set, 1000)["test_acc"]
        log.write(**record)
        if step % work.ckpt_every == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "manager": manager.state_dict()}, durable + ".tmp")
            os.replace(durable + ".tmp", durable)
    log.write(kind="done", slot=slot)
    os._exit(0)  # the peers may still be in a collective with this replica: no clean-up


def run_torchft(work: Work, schedule: Schedule, tmp: str, job: str, heartbeat_ms: int,
                join_ms: int) -> dict:
    """A lighthouse here, one process per replica group; the schedule SIGKILLs a slot's
    process and starts a new one for the slot at its up time."""
    from torchft.coordination import LighthouseServer

    launch = time.time()
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=join_ms,
                                  heartbeat_timeout_ms=heartbeat_ms)
    log = StepLog(os.path.join(tmp, "steps.jsonl"))
    procs: dict[int, subprocess.Popen] = {}
    lives = [0] * work.workers

    def join(slot: int) -> None:
        lives[slot] += 1
        procs[slot] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.goodput", "--child", "torchft_replica",
             "--job", job, "--slot", str(slot), "--life", str(lives[slot]),
             "--lighthouse", lighthouse.address()],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"replica{slot}.err"), "a"))

    def kill(slot: int) -> bool:
        proc = procs.pop(slot, None)
        if proc is not None:
            proc.kill()
            proc.wait()
        return proc is not None

    for slot in range(work.workers):
        join(slot)
    chaos = Chaos(schedule.outages, lambda: log.first("start"), kill, join)
    chaos.start()
    try:
        while not any(r["kind"] == "done" for r in log.read()):
            if time.time() - launch > 1800:
                raise RuntimeError("torchft: no replica finished within 1800 s")
            time.sleep(0.2)
    finally:
        chaos.done.set()
        chaos.join(5)
        for slot in list(procs):
            kill(slot)
        lighthouse.shutdown()
    records = log.read()
    steps = [r for r in records if r["kind"] == "step"]
    failed = {r["step"] for r in records if r["kind"] == "failed"}
    return {"launch": launch, "t0": log.first("start"), "steps": steps,
            "redone": len(failed) + len(steps) - len({r["step"] for r in steps}),
            "applied": chaos.applied,
            "notes": f"{sum(lives) - work.workers} replicas relaunched"}


# --------------------------------------------------------------------------- one run
@dataclass
class Result:
    """What the table shows of one side on one seed and schedule."""

    side: str
    seed: int
    startup_s: float = math.nan  # launch to the first training step
    to_target_s: float = math.nan  # first step to the first evaluation >= target (nan: never)
    to_budget_s: float = math.nan  # first step to the end of the budget
    samples_per_s: float = math.nan  # budget / to_budget_s
    redone: int = 0
    usd: float = math.nan
    acc: float = math.nan  # the last evaluation
    notes: str = ""

    @property
    def reached(self) -> bool:
        return not math.isnan(self.to_target_s)

    @property
    def from_launch_s(self) -> float:
        """Launch to the target: start-up included."""
        return self.startup_s + self.to_target_s


def summarize(side: str, seed: int, raw: dict, work: Work, schedule: Schedule) -> Result:
    """The table's figures from a side's raw log (times in time.time())."""
    if raw.get("error") or raw.get("t0") is None:
        return Result(side, seed, notes=f"failed: {raw.get('error', 'no step')}"[:200])
    t0 = raw["t0"]
    steps = sorted(raw["steps"], key=lambda r: r["t"])
    evals = [r for r in steps if "acc" in r]
    hit = next((r["t"] - t0 for r in evals if r["acc"] >= work.target), math.nan)
    end = next((r["t"] - t0 for r in steps if r["samples"] >= work.budget), math.nan)
    startup = t0 - raw["launch"]
    usd = schedule.cost(work.workers, -startup, end) if not math.isnan(end) else math.nan
    applied = raw.get("applied", [])
    kills = sum(a[1] == "kill" for a in applied if math.isnan(end) or a[0] <= end)
    return Result(side, seed, startup, hit, end, work.budget / end, raw["redone"], usd,
                  evals[-1]["acc"] if evals else math.nan,
                  f"{kills} machines lost; {raw.get('notes', '')}")


def run_side(side: str, work: Work, schedule: Schedule, args: argparse.Namespace,
             tmp: str) -> dict:
    """The side in a fresh process; its raw result (or the error)."""
    job = os.path.join(tmp, "job.json")
    out = os.path.join(tmp, "out.json")
    with open(job, "w") as f:
        json.dump({"side": side, "work": asdict(work), "schedule": schedule.to_json(),
                   "tmp": tmp, "out": out, "delay": args.delay, "monitor_s": args.monitor_s,
                   "heartbeat_ms": args.heartbeat_ms, "join_ms": args.join_ms}, f)
    cmd = [sys.executable, "-m", "benchmarks.goodput", "--child", side, "--job", job]
    with open(os.path.join(tmp, "child.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after {args.run_timeout} s"}
    if not os.path.exists(out):
        with open(os.path.join(tmp, "child.log")) as f:
            tail = f.read()[-400:].replace("\n", " ")
        return {"error": f"exit {proc.returncode}: {tail}"}
    with open(out) as f:
        return json.load(f)


def child(args: argparse.Namespace) -> None:
    """The body of a side's process (--child)."""
    with open(args.job) as f:
        job = json.load(f)
    work, schedule, tmp = Work(**job["work"]), Schedule.from_json(job["schedule"]), job["tmp"]
    if args.child == "torchft_replica":
        torchft_replica(work, args.slot, args.life, args.lighthouse, tmp)
        return
    try:
        if args.child == "squall":
            raw = run_squall(work, schedule, tmp, job["delay"])
        elif args.child in ("ray_fixed", "ray_elastic"):
            raw = run_ray_train(work, schedule, tmp, args.child == "ray_elastic",
                                job["monitor_s"])
        else:
            raw = run_torchft(work, schedule, tmp, args.job, job["heartbeat_ms"],
                              job["join_ms"])
    except Exception as e:  # noqa: BLE001 (the table says which side failed and why)
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raw = {"error": f"{type(e).__name__}: {e} ({Path(frame.filename).name}:{frame.lineno})"}
    with open(job["out"], "w") as f:
        json.dump(raw, f)
    os._exit(0)  # leftover threads of Ray or gloo must not hold the process


# --------------------------------------------------------------------------- the table
def median(values: list[float]) -> float:
    """The median of the finite values, inf when a value is missing (a run that never got
    there counts as slower than any that did)."""
    vals = [math.inf if math.isnan(v) else v for v in values]
    return statistics.median(vals) if vals else math.nan


def verdicts(results: dict[str, list[Result]]) -> list[tuple[str, bool, str]]:
    """(claim, holds, the numbers) for squall against each peer, from the medians."""
    out = []
    sq = results.get("squall", [])
    if not sq:
        return out
    for peer in PEERS:
        other = results.get(peer, [])
        if not other:
            continue
        for what, attr, better in (("median time to target", "to_target_s", "<="),
                                   ("median time from launch to target", "from_launch_s", "<="),
                                   ("median samples/s", "samples_per_s", ">="),
                                   ("median dollars", "usd", "<=")):
            a = median([getattr(r, attr) for r in sq])
            b = median([getattr(r, attr) for r in other])
            if attr == "samples_per_s":
                a, b = median_rate(sq), median_rate(other)
            holds = a <= b if better == "<=" else a >= b
            digits = 5 if attr == "usd" else 1
            out.append((f"squall's {what} {better} {LABELS[peer]}'s", holds,
                        f"{fmt(a, digits)} vs {fmt(b, digits)}"))
    return out


def median_rate(results: list[Result]) -> float:
    """The median samples/s, a run that never finished its budget counting as 0."""
    return median([0.0 if math.isnan(r.samples_per_s) else r.samples_per_s for r in results])


def fmt(v: float, digits: int = 1) -> str:
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "never"
    return f"{v:.{digits}f}"


def table(results: dict[str, list[Result]], work: Work) -> list[str]:
    lines = ["| side | reached target | time to target s (median) | start-up s | "
             "time to budget s | samples/s | steps redone | dollars | final acc |",
             "|---" * 9 + "|"]
    for side, rs in results.items():
        reached = sum(r.reached for r in rs)
        usd, hit = median([r.usd for r in rs]), median([r.to_target_s for r in rs])
        lines.append(
            f"| {LABELS[side]} | {reached}/{len(rs)} | **{fmt(hit)}**"
            f" | {fmt(median([r.startup_s for r in rs]))} | "
            f"{fmt(median([r.to_budget_s for r in rs]))} | "
            f"{fmt(median_rate(rs), 0)} | "
            f"{fmt(median([float(r.redone) for r in rs if not math.isnan(r.startup_s)]), 0)} | "
            f"{fmt(usd, 5) if not math.isinf(usd) else 'never'} | "
            f"{fmt(median([r.acc for r in rs]), 3)} |")
    lines += ["", "Every run (seconds after the side's first step unless said):", "",
              "| side | seed | target at s | start-up s | budget at s | samples/s | redone | "
              "dollars | final acc | notes |", "|---" * 10 + "|"]
    for side, rs in results.items():
        for r in rs:
            lines.append(f"| {side} | {r.seed} | {fmt(r.to_target_s)} | {fmt(r.startup_s)} | "
                         f"{fmt(r.to_budget_s)} | {fmt(r.samples_per_s, 0)} | {r.redone} | "
                         f"{fmt(r.usd, 5)} | {fmt(r.acc, 3)} | {r.notes} |")
    lines += ["", "Verdicts (computed from the medians above):", ""]
    lines += [f"- {'**holds**' if ok else '**fails**'}: {claim} ({nums})"
              for claim, ok, nums in verdicts(results)]
    return lines


def report(args: argparse.Namespace, work: Work, name: str, results: dict,
           outages: dict[int, Schedule]) -> str:
    """The part of goodput.md for one schedule: how it was produced (each schedule's part is
    rewritten only when that schedule is run), the tables and the verdicts."""
    seeds = args.seeds if name == "poisson" else args.trace_seeds or args.seeds
    load = os.getloadavg()[0]
    import ray
    import torch
    try:
        from importlib.metadata import version
        ft = version("torchft")
    except Exception:  # noqa: BLE001
        ft = "?"
    seeds_flag = f"--seeds {seeds}" if name == "poisson" else f"--trace-seeds {seeds}"
    cmd = ("python -m benchmarks.goodput " + " ".join(
        [seeds_flag, f"--budget {work.budget}", f"--target {work.target}",
         f"--schedules {name}", f"--rate {args.rate:g}", f"--delay {args.delay:g}"]))
    head = [
        f"### Schedule: {name}", "",
        f"Produced by `{cmd}` on {datetime.now().strftime('%Y-%m-%d')}; machine: "
        f"{os.cpu_count()} cores ({platform.machine()}), load average {load:.1f} at the end, "
        f"torch {torch.__version__}, Ray {ray.__version__}, torchft {ft}.", "",
        f"- work (equal on every side): the CNN (width {work.width}, hidden {work.hidden}) on "
        f"digits, {work.workers} worker slots x batch {work.batch}, SGD lr {work.lr} momentum "
        f"0.9, the same initial weights, shards and per-step batches; budget {work.budget} "
        f"samples in surviving updates (a step with k live workers counts k x {work.batch}); "
        f"target test accuracy {work.target} (evaluated every {work.eval_every} steps on the "
        f"digits test split, 360 images); seeds 0-{seeds - 1}",
        "- time to target and to budget: from the side's first training step (the schedule's "
        "clock); start-up (launch to the first step: cluster, workers, process groups) is its "
        "own column; a run that never reached the target counts as `never` in the median",
        "- steps redone (median over the runs that ended): squall: calls of the collective "
        "plane cut by a loss (the survivor's step in flight is discarded and run again); "
        "Ray Train: steps run again after a restart from the latest checkpoint (rank 0's "
        "log); torchft: steps whose commit failed, plus steps rerun after a replica "
        "restarted from the durable copy",
        "- dollars: every slot's machine billed while up, from launch to the end of the "
        "budget, " + (f"at a flat ${args.price}/h (cloud.spot_price's default)"
                      if name == "poisson" else "at each zone's trace price"),
        (f"- poisson: each slot fails at {args.rate:g}/h of wall time while up, its new "
         f"machine joins {args.delay:g} s later" if name == "poisson" else
         "- trace: one synthetic zone per slot (cloud.traces.synthetic_trace, seed 1000 x "
         f"seed + slot) compressed {args.time_scale:g}x, bid ${args.bid}/h, the new machine "
         f"{args.delay:g} s after the loss once the price is at or below the bid"),
        f"- squall: cloud=simulated, its pool drawing no reclaims: a harness thread kills the "
        "slot's Ray node and worker process mid-step, the loop finds the loss itself, the "
        "replacement node joins at the scheduled time (worker.plane=collective, no warm "
        "nodes, no checkpoints during the run); Ray Train: TorchTrainer (Train V2), "
        "FailureConfig(max_failures=-1), checkpoint every "
        f"{work.ckpt_every} steps, the slot's node removed and re-added on the same schedule; "
        f"elastic with elastic_resize_monitor_interval_s={args.monitor_s:g}; torchft: "
        f"Manager + gloo, one process per replica group, lighthouse min_replicas=1, "
        f"heartbeat timeout {args.heartbeat_ms} ms, join timeout {args.join_ms} ms; the "
        f"participating rank 0 keeps a durable copy every {work.ckpt_every} steps (used only "
        "when no peer is left)", ""]
    body = table(results, work)
    body += ["", "Outages per seed (slot: down-up s after the first step, first 60 s): " +
             "; ".join(f"seed {s}: " + ", ".join(
                 f"{o.slot}: {o.down:.1f}-{o.up:.1f}" for o in sch.outages if o.down < 60)
                 for s, sch in outages.items())]
    return "\n".join([*head, *body])


def make_schedule(name: str, seed: int, args: argparse.Namespace, workers: int) -> Schedule:
    if name == "poisson":
        return poisson_schedule(seed, workers, args.rate, args.delay, price=args.price)
    return trace_schedule(seed, workers, args.bid, args.time_scale, args.delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trace-seeds", type=int, help="seeds of the trace schedule "
                        "(default: --seeds)")
    parser.add_argument("--budget", type=int, default=Work.budget)
    parser.add_argument("--target", type=float, default=Work.target)
    parser.add_argument("--schedules", nargs="+", default=["poisson", "trace"],
                        choices=["poisson", "trace"])
    parser.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES)
    parser.add_argument("--rate", type=float, default=90.0, help="failures per slot per hour")
    parser.add_argument("--delay", type=float, default=3.0, help="s until a new machine joins")
    parser.add_argument("--price", type=float, default=0.1)
    parser.add_argument("--bid", type=float, default=0.2)
    parser.add_argument("--time-scale", type=float, default=300.0)
    parser.add_argument("--monitor-s", type=float, default=1.0)
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--join-ms", type=int, default=1000)
    parser.add_argument("--run-timeout", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="1 seed, small budget; no markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--life", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lighthouse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.seeds, args.budget = 1, 12_800
    from benchmarks.md_parts import write_part

    results: dict[str, dict[str, list[Result]]] = {}
    schedules: dict[str, dict[int, Schedule]] = {}
    for name in args.schedules:
        seeds = args.seeds if name == "poisson" else args.trace_seeds or args.seeds
        for seed in range(seeds):
            work = Work(budget=args.budget, target=args.target, seed=seed)
            schedule = make_schedule(name, seed, args, work.workers)
            schedules.setdefault(name, {})[seed] = schedule
            order = args.sides[seed % len(args.sides):] + args.sides[:seed % len(args.sides)]
            for side in order:
                with tempfile.TemporaryDirectory(prefix=f"goodput-{side}-") as tmp:
                    raw = run_side(side, work, schedule, args, tmp)
                r = summarize(side, seed, raw, work, schedule)
                results.setdefault(name, {s: [] for s in args.sides})[side].append(r)
                print(f"{name} seed {seed} {side}: {asdict(r)}", flush=True)
        text = report(args, Work(budget=args.budget, target=args.target), name,
                      results[name], schedules[name])
        if not args.quick:  # after each schedule: a late failure keeps what was measured
            write_part(MD, TITLE, f"schedule:{name}", text)
        print(text)


if __name__ == "__main__":
    main()
