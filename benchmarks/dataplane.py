"""Data-plane prototypes for issue 17, side by side with bare PyTorch DDP (gloo).

    .venv/bin/python -m benchmarks.dataplane                  # full run: 2 and 4 workers, 3 rounds
    .venv/bin/python -m benchmarks.dataplane --quick          # smoke run: prints, writes nothing
    .venv/bin/python -m benchmarks.dataplane --workers 2 --rounds 5 --steps 600
    .venv/bin/python -m benchmarks.dataplane --shipped       # DDP vs squall's two planes only
    .venv/bin/python -m benchmarks.dataplane --shipped --device cuda  # the same on the GPU

Every variant trains squall's default job (model=cnn on data=digits, batch 32 per worker,
SGD lr 0.05 momentum 0.9, seed 0: `load_config(["workers=N"])`) with the same model
(`workload.model`, seeded), the same shards (`shard_of`) and the same batches (squall's
`StepBatches`), one torch thread per process:

- ddp: bare PyTorch DistributedDataParallel over gloo, one plain process per rank (the
  reference);
- squall: the loop on the driver plane (worker.plane=driver, every step a round of Ray task
  calls through the driver), `orchestrator.api.train` with eval and checkpoints off; its step
  times are the `wall_s` deltas of the run directory's metrics.jsonl (the whole loop, logging
  included);
- squall-collective: the same call on the collective plane squall ships for strategy=mean
  (worker.plane=collective, orchestrator/collective.py: design (d) in the real loop);
- cgraph: a Ray Compiled Graph of the parameter-server step, compiled once: the driver's flat
  parameters go to every worker actor over shared-memory channels (InputNode), the gradients
  come back (MultiOutputNode), and the driver runs squall's `Aggregation` (mean) and SGD;
- cgraph-agg: the same graph with the driver's part on an aggregator actor (parameters from
  it, gradients to it), so the driver only feeds step numbers and keeps two executions in
  flight;
- collective: each worker actor joins a torch.distributed gloo group (TCP rendezvous on a
  port the driver picks) and runs its own steps (forward/backward, all-reduce of the flat
  gradient, SGD) in chunks of steps whose per-step times and losses come back as the chunk's
  result; the driver keeps two chunks in flight and only handles control.

ms/step is the wall time of the steps after --warmup divided by their number, measured where
the steps happen (DDP and collective: rank 0; cgraph: the driver; squall: its metrics.jsonl);
each round of each variant is a fresh process (a fresh Ray session), the variants interleave
and their order rotates per round. The ratio is the variant's step rate over DDP's in the same
round (median of the rounds).

Membership change (once per worker count, after the rounds): SIGKILL one worker actor (rank 0)
mid-run and time, for the compiled graph, kill -> exception on the driver, teardown, recompiling
over the survivors and their first step; for the collectives, kill -> the survivors' all-reduce
failing, destroy_process_group + init_process_group over the survivors (new port, new world)
without restarting actors, and their first steps.

--shipped runs only ddp, squall and squall-collective, then the shipped plane's membership
change (a member SIGKILLed, a replacement joining: `child_shipped_membership`), and writes
the `shipped-*` blocks; a full run writes the `workers-*` blocks (prototypes and membership).

Writes the part of benchmarks/dataplane.md between `<!-- generated -->` and
`<!-- end generated -->` (one block per worker count, through benchmarks/md_parts.write_part);
the dated reading notes below it are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback (inherited by actors)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.md_parts import (  # noqa: E402
    END_GENERATED,
    GENERATED,
    invocation,
    write_generated,
    write_part,
)
from orchestrator.config import Config, load_config  # noqa: E402
from orchestrator.data import StepBatches, shard_of  # noqa: E402
from orchestrator.models import flat_grads, float_buffers, share_flat  # noqa: E402
from orchestrator.optimizer import build_optimizer  # noqa: E402
from orchestrator.parameter_server import Aggregation  # noqa: E402
from orchestrator.workload import Workload, data_info, resolve_workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MD = Path(__file__).with_suffix(".md")
TITLE = "squall: data-plane prototypes vs bare PyTorch DDP (issue 17)"
NOTES_STUB = ("## Reading notes\n\n(Hand-written, dated; `python -m benchmarks.dataplane` "
              "never rewrites this section.)\n")
VARIANTS = {  # key -> label, in table order
    "ddp": "(a) bare PyTorch DDP, gloo (reference)",
    "squall": "(b) squall, worker.plane=driver: Ray task calls through the driver",
    "cgraph": "(c) Ray Compiled Graph, mean + SGD on the driver",
    "cgraph-agg": "(c') Ray Compiled Graph, mean + SGD on an aggregator actor, 2 in flight",
    "collective": "(d) gloo all-reduce among the worker actors",
    "squall-collective": "(e) squall as shipped: worker.plane=collective, the real loop",
}
SHIPPED = ("ddp", "squall", "squall-collective")  # --shipped: the planes squall ships
TARGET = 0.9  # issue 17: >= 0.9x bare DDP's step rate
LOSS_TAIL = 50  # final loss: mean over the last steps
CHUNK = 50  # collective: steps per run() call
KILL_AFTER_S = 1.0  # membership change: kill this long after the first step after warm-up
VICTIM = 0  # the rank killed (for the collectives it hosts the rendezvous store)
CHILD_TIMEOUT_S = 600
FAULTS = ("cgraph-fault", "collective-fault", "collective-fault-store")
GROUP_TIMEOUT_S = 20  # gloo: a member that waits this long on a peer raises


@dataclass(frozen=True)
class Settings:
    steps: int
    warmup: int
    rounds: int
    workers: tuple[int, ...]
    quick: bool
    variants: tuple[str, ...] = tuple(VARIANTS)  # --shipped: SHIPPED
    faults: bool = True  # the membership-change runs (not with --shipped)
    device: str = "cpu"  # --device cuda: the shipped variants on the GPU (with --shipped)


# =========================================================================== the job
def job(workers: int, device: str = "cpu") -> Config:
    """squall's default job with `workers` workers (cnn, digits, batch 32, SGD 0.05 m 0.9)
    on `device` (cuda: every worker on the machine's GPU, which they share)."""
    return load_config([f"workers={workers}", "log.progress=false", f"worker.device={device}"])


def replica(workers: int, rank: int, device: str = "cpu"
            ) -> tuple[Config, Workload, torch.nn.Module, StepBatches]:
    """What a squall worker of `rank` builds: the seeded model (on `device`) and its shard's
    batches."""
    torch.set_num_threads(1)
    cfg = job(workers, device)
    workload = resolve_workload(cfg)
    info = data_info(workload.dataset("test"))  # as squall's driver: from the test split
    train_set = workload.dataset("train")
    shard = shard_of(train_set, rank, workers, cfg.data, cfg.seed)
    batches = StepBatches(train_set, shard, cfg.data, cfg.seed, rank)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    return cfg, workload, workload.model(info).to(device), batches


class FlatReplica:
    """A squall worker's state: model, batches, parameters+buffers and gradient as flat
    vectors (share_flat, flat_grads), as in orchestrator/workers.py."""

    def __init__(self, workers: int, rank: int) -> None:
        self.cfg, self.workload, self.model, self.batches = replica(workers, rank)
        self.rank = rank
        self.params = list(self.model.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        self.state = share_flat(self.params + float_buffers(self.model))
        self.grad = flat_grads(self.params)

    def pid(self) -> int:
        return os.getpid()

    def backward(self, step: int) -> float:
        """The gradient of this step's batch into self.grad; returns the loss."""
        self.model.train()
        self.grad.zero_()
        loss = self.workload.loss(self.model, self.batches(step)[0])
        loss.backward()
        return float(loss)


class DriverModel:
    """The parameter server's half: model, flat state, squall's Aggregation and optimizer."""

    def __init__(self, workers: int) -> None:
        torch.set_num_threads(1)
        self.cfg = job(workers)
        workload = resolve_workload(self.cfg)
        torch.manual_seed(self.cfg.seed)
        model = workload.model(data_info(workload.dataset("test")))
        params = list(model.parameters())
        self.state = share_flat(params + float_buffers(model))
        self.grad = flat_grads(params)
        self.optimizer = build_optimizer(self.cfg.optim, params)
        self.aggregation = Aggregation(self.cfg)

    def apply(self, results: list[tuple[np.ndarray, float, int, float]], step: int) -> float:
        """Aggregate the (gradient, loss, rank, compute s) of the workers, take the SGD
        step; returns the mean loss."""
        grads = torch.from_numpy(np.stack([r[0] for r in results]))  # a copy off the channel
        update = self.aggregation(grads, [r[2] for r in results], step)
        if update is not None:
            self.grad.copy_(update)
            self.optimizer.step()
        return float(np.mean([r[1] for r in results]))


# =========================================================================== helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def window_ms(ends: list[float], warmup: int) -> float:
    """ms per step over the steps after `warmup` (ends: completion time of each step, s)."""
    return (ends[-1] - ends[warmup - 1]) * 1e3 / (len(ends) - warmup)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def start_ray(workers: int) -> None:
    ray.init(address="local", num_cpus=workers, include_dashboard=False,
             logging_level="warning", log_to_driver=False)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, without a leading [source:line] tag."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text[0] if text else "")
    line = re.sub(r"(\[127\.0\.0\.1\]):\d+", r"\1:<port>", line)  # same text per cause
    return line[:80]


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# =========================================================================== (a) DDP
def child_ddp_rank(workers: int, rank: int, port: int, steps: int, device: str = "cpu") -> dict:
    """One rank of bare DDP: forward/backward with DDP's bucketed all-reduce, SGD (gloo on
    cuda too: the ranks share one GPU, which NCCL refuses). A step ends when its work on the
    device has."""
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.workload import to_device

    cfg, workload, model, batches = replica(workers, rank, device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=workers, timeout=timedelta(seconds=60))
    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(cfg.optim, list(ddp.parameters()))
    ends, losses = [], []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = workload.loss(ddp, to_device(batches(step)[0], torch.device(device)))
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        losses.append(float(loss))
    dist.destroy_process_group()
    return {"ends": ends, "losses": losses, "phases": {}}


def run_ddp(workers: int, s: Settings) -> dict:
    """The DDP ranks as plain processes; rank 0's clock, the ranks' mean loss."""
    port = free_port()
    procs = [spawn(["--child", "ddp-rank", "--workers", str(workers), "--rank", str(r),
                    "--port", str(port), "--steps", str(s.steps), "--device", s.device])
             for r in range(workers)]
    results = [collect(p) for p in procs]
    if failed := [r for r in results if "error" in r]:
        return failed[0]
    losses = np.mean([r["losses"] for r in results], axis=0).tolist()
    return {"ends": results[0]["ends"], "losses": losses, "phases": {}}


# =========================================================================== (b) squall
def child_squall(workers: int, steps: int, plane: str, device: str = "cpu") -> dict:
    """squall's loop end to end on worker.plane=`plane`; step completion times from
    metrics.jsonl's wall_s (the collective plane's calls of worker.steps_per_call steps
    share their time evenly: the timed window is long, so only its edges are smoothed)."""
    from orchestrator.api import train
    from orchestrator.metrics import read_metrics

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dataplane-") as tmp:
        summary = train([f"workers={workers}", f"steps={steps}", "eval.every=0",
                         f"worker.plane={plane}", f"worker.device={device}",
                         "checkpoint.every_steps=0", "log.progress=false", f"run.dir={tmp}",
                         "run.name=squall"])
        rows = read_metrics(Path(summary["run_dir"]))
    return {"ends": [r["wall_s"] for r in rows], "losses": [r["loss"] for r in rows],
            "phases": {"step_s as recorded (median; no logging)":
                       median_ms([r["step_s"] for r in rows[len(rows) // 5:]])}}


# =========================================================================== (c) cgraph
class GraphWorker(FlatReplica):
    """A worker actor of the compiled graph: parameters in, gradient out."""

    def gradient(self, msg: tuple[np.ndarray, int]) -> tuple[np.ndarray, float, int, float]:
        state, step = msg
        t0 = time.perf_counter()
        self.state.copy_(torch.from_numpy(state))
        loss = self.backward(step)
        # a view is safe: the channel copies it out before the next execution
        return self.grad.numpy(), loss, self.rank, time.perf_counter() - t0


class Aggregator(DriverModel):
    """The driver's half on an actor: publishes parameters, applies the gradients."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.step = 0

    def publish(self, step: int) -> tuple[np.ndarray, int]:
        self.step = step
        return self.state.numpy(), step

    def update(self, *results: tuple[np.ndarray, float, int, float]) -> tuple[float, float]:
        """(mean loss, the slowest worker's compute s)."""
        return self.apply(list(results), self.step), max(r[3] for r in results)


RemoteGraphWorker = ray.remote(num_cpus=1)(GraphWorker)
RemoteAggregator = ray.remote(num_cpus=0)(Aggregator)


def driver_graph(actors: list[Any]) -> Any:
    """InputNode (parameters, step) -> every worker's gradient -> MultiOutputNode."""
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([a.gradient.bind(inp) for a in actors])
    return dag.experimental_compile()


def aggregator_graph(agg: Any, actors: list[Any]) -> Any:
    """InputNode (step) -> aggregator publishes -> gradients -> aggregator updates."""
    from ray.dag import InputNode

    with InputNode() as inp:
        msg = agg.publish.bind(inp)
        dag = agg.update.bind(*[a.gradient.bind(msg) for a in actors])
    return dag.experimental_compile()


def start_graph_workers(workers: int) -> tuple[list[Any], list[int]]:
    actors = [RemoteGraphWorker.remote(workers, r) for r in range(workers)]
    return actors, ray.get([a.pid.remote() for a in actors])


def driver_steps(dag: Any, driver: DriverModel, first: int, n: int,
                 phases: dict[str, list[float]] | None = None) -> tuple[list[float], list[float]]:
    """n steps of the driver-aggregating graph; (completion times, losses)."""
    ends, losses = [], []
    for step in range(first, first + n):
        t0 = time.perf_counter()
        results = ray.get(dag.execute((driver.state.numpy(), step)))
        t1 = time.perf_counter()
        losses.append(driver.apply(results, step))
        ends.append(time.perf_counter())
        if phases is not None:
            phases["driver: execute + get (round trip)"].append(t1 - t0)
            phases["worker: load + forward/backward (slowest)"].append(
                max(r[3] for r in results))
            phases["driver: stack, mean, SGD"].append(ends[-1] - t1)
    return ends, losses


def timed_driver_graph(actors: list[Any]) -> tuple[Any, float]:
    """driver_graph(actors), and the ms its compile took."""
    t0 = time.perf_counter()
    dag = driver_graph(actors)
    return dag, (time.perf_counter() - t0) * 1e3


def child_cgraph(workers: int, steps: int) -> dict:
    start_ray(workers)
    try:
        actors, _ = start_graph_workers(workers)
        driver = DriverModel(workers)
        dag, compile_ms = timed_driver_graph(actors)
        phases: dict[str, list[float]] = {k: [] for k in (
            "driver: execute + get (round trip)", "worker: load + forward/backward (slowest)",
            "driver: stack, mean, SGD")}
        ends, losses = driver_steps(dag, driver, 1, steps, phases)
        dag.teardown()
    finally:
        ray.shutdown()
    cut = len(ends) // 5
    return {"ends": ends, "losses": losses, "info": {"compile_ms": compile_ms},
            "phases": {k: median_ms(v[cut:]) for k, v in phases.items()}}


def child_cgraph_agg(workers: int, steps: int, depth: int = 2) -> dict:
    start_ray(workers)
    try:
        actors, _ = start_graph_workers(workers)
        agg = RemoteAggregator.remote(workers)
        ray.get(agg.publish.remote(0))
        dag = aggregator_graph(agg, actors)
        ends, losses, compute = [], [], []
        pending: deque = deque()

        def take() -> None:
            loss, slowest = ray.get(pending.popleft())
            ends.append(time.perf_counter())
            losses.append(loss)
            compute.append(slowest)

        for step in range(1, steps + 1):
            pending.append(dag.execute(step))
            if len(pending) == depth:
                take()
        while pending:
            take()
        dag.teardown()
    finally:
        ray.shutdown()
    return {"ends": ends, "losses": losses, "phases": {
        "worker: load + forward/backward (slowest)": median_ms(compute[len(compute) // 5:])}}


# =========================================================================== (d) collective
class CollectiveWorker(FlatReplica):
    """A worker actor in a gloo process group: its own steps, all-reduce of the gradient."""

    def __init__(self, workers: int, rank: int) -> None:
        super().__init__(workers, rank)
        self.optimizer = build_optimizer(self.cfg.optim, self.params)
        self.world = workers
        self.client: Any = None  # a connection to the driver's TCPStore, if it hosts one
        self.left: tuple[float, str] | None = None  # destroy seconds and error, once left

    def join(self, port: int, rank: int, world: int, prefix: str = "") -> float:
        """Join the group (rank, world); returns seconds. Without `prefix` the rendezvous
        is init_method tcp://127.0.0.1:port (rank 0 hosts the store); with one, the
        driver's TCPStore at that port, under that key prefix (one per group)."""
        t0 = time.perf_counter()
        timeout = timedelta(seconds=GROUP_TIMEOUT_S)
        if prefix:
            if self.client is None:
                self.client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
            dist.init_process_group("gloo", store=dist.PrefixStore(prefix, self.client),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world, timeout=timeout)
        self.world, self.left = world, None
        return time.perf_counter() - t0

    def leave(self) -> tuple[float, str]:
        """destroy_process_group(): (seconds, what it raised or '')."""
        t0 = time.perf_counter()
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - reported: part of the measurement
            return time.perf_counter() - t0, f"{type(e).__name__}: {first_line(e)}"
        return time.perf_counter() - t0, ""

    def reform(self, port: int, rank: int, world: int, prefix: str = "") -> dict:
        """Leave the broken group (unless a failed all-reduce already did) and join a new
        one, in this process: seconds of each."""
        destroy_s, error = self.left or self.leave()
        return {"destroy_s": destroy_s, "destroy_error": error,
                "init_s": self.join(port, rank, world, prefix)}

    def run(self, first: int, n: int) -> dict:
        """Steps first..first+n-1; per step its completion time, loss and phase seconds.
        A failing all-reduce (a member died) ends the call with the error and its time,
        after leaving the group: closing this member's connections makes the members
        still waiting on it fail too, instead of waiting out GROUP_TIMEOUT_S."""
        out: dict[str, Any] = {"ends": [], "losses": [], "compute": [], "allreduce": [],
                               "optimizer": [], "error": "", "t_error": 0.0}
        for step in range(first, first + n):
            t0 = time.perf_counter()
            loss = self.backward(step)
            t1 = time.perf_counter()
            try:
                dist.all_reduce(self.grad)
            except Exception as e:  # noqa: BLE001 - a peer died: reported to the driver
                out["error"] = f"{type(e).__name__}: {first_line(e)}"
                out["t_error"] = time.time()
                self.left = self.leave()
                return out
            t2 = time.perf_counter()
            self.grad.div_(self.world)
            self.optimizer.step()
            t3 = time.perf_counter()
            for key, value in (("ends", t3), ("losses", loss), ("compute", t1 - t0),
                               ("allreduce", t2 - t1), ("optimizer", t3 - t2)):
                out[key].append(value)
        return out


RemoteCollectiveWorker = ray.remote(num_cpus=1)(CollectiveWorker)


class Rendezvous:
    """Where groups meet: a new port per group (init_method tcp://, the store on the
    group's rank 0), or one TCPStore hosted by the driver and a key prefix per group."""

    def __init__(self, driver_store: bool) -> None:
        self.store = None
        self.generation = 0
        if driver_store:
            self.port = free_port()
            self.store = dist.TCPStore("127.0.0.1", self.port, is_master=True,
                                       wait_for_workers=False,
                                       timeout=timedelta(seconds=GROUP_TIMEOUT_S))

    def next(self) -> tuple[int, str]:
        """(port, key prefix) of the next group."""
        self.generation += 1
        if self.store is None:
            return free_port(), ""
        return self.port, f"group{self.generation}/"


def start_group(workers: int, rendezvous: Rendezvous) -> tuple[list[Any], list[int], float]:
    """The worker actors, their pids, and the ms to form their group (once they are up)."""
    actors = [RemoteCollectiveWorker.remote(workers, r) for r in range(workers)]
    pids = ray.get([a.pid.remote() for a in actors])
    port, prefix = rendezvous.next()
    t0 = time.perf_counter()
    ray.get([a.join.remote(port, r, workers, prefix) for r, a in enumerate(actors)])
    return actors, pids, (time.perf_counter() - t0) * 1e3


def group_steps(actors: list[Any], first: int, steps: int) -> dict:
    """Steps in chunks of CHUNK, two chunks in flight; rank 0's times, the mean losses."""
    merged: dict[str, list] = {"ends": [], "losses": [], "compute": [], "allreduce": [],
                               "optimizer": []}
    pending: deque = deque()

    def take() -> None:
        outs = ray.get(pending.popleft())
        if error := next((o["error"] for o in outs if o["error"]), ""):
            raise RuntimeError(error)
        for key in ("ends", "compute", "allreduce", "optimizer"):
            merged[key] += outs[0][key]
        merged["losses"] += np.mean([o["losses"] for o in outs], axis=0).tolist()

    for start in range(first, first + steps, CHUNK):
        pending.append([a.run.remote(start, min(CHUNK, first + steps - start)) for a in actors])
        if len(pending) == 2:
            take()
    while pending:
        take()
    return merged


def child_collective(workers: int, steps: int) -> dict:
    start_ray(workers)
    try:
        actors, _, _ = start_group(workers, Rendezvous(driver_store=False))
        out = group_steps(actors, 1, steps)
    finally:
        ray.shutdown()
    cut = steps // 5
    return {"ends": out["ends"], "losses": out["losses"], "phases": {
        "rank 0: batch + forward/backward": median_ms(out["compute"][cut:]),
        "rank 0: all-reduce of the flat gradient": median_ms(out["allreduce"][cut:]),
        "rank 0: SGD step": median_ms(out["optimizer"][cut:])}}


# =========================================================================== membership
def kill_later(pid: int, delay: float, clock: Callable[[], float]) -> dict:
    """SIGKILL pid after `delay` s from a timer thread; the dict gets the kill time ("t")."""
    when: dict[str, float] = {}

    def fire() -> None:
        when["t"] = clock()
        os.kill(pid, signal.SIGKILL)

    threading.Timer(delay, fire).start()
    return when


def cgraph_until_failure(dag: Any, driver: DriverModel, first: int) -> tuple[dict, int]:
    """Steps until execute/get raises; (what was raised and when, the next step)."""
    step = first
    while True:
        stage = "execute"
        try:
            refs = dag.execute((driver.state.numpy(), step))
            stage = "get"
            driver.apply(ray.get(refs), step)
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            return {"t": time.perf_counter(), "stage": stage,
                    "error": f"{type(e).__name__}: {first_line(e)}"}, step
        step += 1


def teardown(dag: Any) -> tuple[float, str]:
    """dag.teardown(): (ms, what it raised or '')."""
    t0 = time.perf_counter()
    try:
        dag.teardown()
    except Exception as e:  # noqa: BLE001 - reported
        return (time.perf_counter() - t0) * 1e3, f"{type(e).__name__}: {first_line(e)}"
    return (time.perf_counter() - t0) * 1e3, ""


def cgraph_recover(dag: Any, actors: list[Any], driver: DriverModel, step: int,
                   warmup: int) -> dict:
    """Tear the failed graph down, compile one over the survivors, run steps on it."""
    teardown_ms, teardown_error = teardown(dag)
    t0 = time.perf_counter()
    survivors = [a for r, a in enumerate(actors) if r != VICTIM]
    dag = driver_graph(survivors)
    t1 = time.perf_counter()
    driver_steps(dag, driver, step, 1)
    t2 = time.perf_counter()
    ends, _ = driver_steps(dag, driver, step + 1, warmup + 50)
    dag.teardown()
    return {"teardown_ms": teardown_ms, "teardown_error": teardown_error,
            "rebuild_ms": (t1 - t0) * 1e3, "reform_ms": teardown_ms + (t1 - t0) * 1e3,
            "first_step_ms": (t2 - t1) * 1e3, "after_ms": window_ms(ends, warmup),
            "survivors": len(survivors)}


def child_cgraph_fault(workers: int, warmup: int) -> dict:
    """Kill a worker of a running compiled graph; teardown, recompile over the survivors."""
    start_ray(workers)
    try:
        actors, pids = start_graph_workers(workers)
        driver = DriverModel(workers)
        dag, compile_ms = timed_driver_graph(actors)
        driver_steps(dag, driver, 1, warmup)
        kill = kill_later(pids[VICTIM], KILL_AFTER_S, time.perf_counter)
        failure, step = cgraph_until_failure(dag, driver, warmup + 1)
        recovered = cgraph_recover(dag, actors, driver, step, warmup)
    finally:
        ray.shutdown()
    return {"form_ms": compile_ms, "detect_ms": (failure["t"] - kill["t"]) * 1e3,
            "raised": failure["error"], "stage": failure["stage"], **recovered}


def reform_group(survivors: list[Any], rendezvous: Rendezvous) -> dict:
    """destroy + init over the survivors (ranks 0..n-1, the next rendezvous), no actor
    restarted."""
    port, prefix = rendezvous.next()
    t0 = time.perf_counter()
    outs = ray.get([a.reform.remote(port, r, len(survivors), prefix)
                    for r, a in enumerate(survivors)])
    return {"reform_ms": (time.perf_counter() - t0) * 1e3,
            "destroy_ms": max(o["destroy_s"] for o in outs) * 1e3,
            "init_ms": max(o["init_s"] for o in outs) * 1e3,
            "destroy_error": next((o["destroy_error"] for o in outs if o["destroy_error"]), "")}


def group_failure(actors: list[Any], pids: list[int], first: int) -> tuple[dict, int]:
    """Every member runs steps from `first` until one is killed; (what the survivors and
    the driver saw, the step to go on from)."""
    kill = kill_later(pids[VICTIM], KILL_AFTER_S, time.time)
    runs = [a.run.remote(first, 10**7) for a in actors]  # until a member dies
    ray.wait(runs, num_returns=1, timeout=120)
    t_driver = time.time()
    outs = ray.get([ref for r, ref in enumerate(runs) if r != VICTIM], timeout=120)
    victim_call = ""
    try:
        ray.get(runs[VICTIM], timeout=30)
    except Exception as e:  # noqa: BLE001 - reported
        victim_call = type(e).__name__
    seen = {"detect_ms": (max(o["t_error"] for o in outs) - kill["t"]) * 1e3,
            "first_detect_ms": (min(o["t_error"] for o in outs) - kill["t"]) * 1e3,
            "driver_knows_ms": (t_driver - kill["t"]) * 1e3,
            "raised": next(o["error"] for o in outs), "victim_call": victim_call}
    return seen, first + max(len(o["ends"]) for o in outs)


def child_collective_fault(workers: int, warmup: int, driver_store: bool) -> dict:
    """Kill a member of a training gloo group; re-form the group over the survivors."""
    start_ray(workers)
    try:
        rendezvous = Rendezvous(driver_store)
        actors, pids, form_ms = start_group(workers, rendezvous)
        group_steps(actors, 1, warmup)
        seen, step = group_failure(actors, pids, warmup + 1)
        survivors = [a for r, a in enumerate(actors) if r != VICTIM]
        reform = reform_group(survivors, rendezvous)
        t0 = time.perf_counter()
        group_steps(survivors, step, 1)
        first_ms = (time.perf_counter() - t0) * 1e3
        ends = group_steps(survivors, step + 1, warmup + 50)["ends"]
    finally:
        ray.shutdown()
    return {"form_ms": form_ms, **seen, **reform, "first_step_ms": first_ms,
            "after_ms": window_ms(ends, warmup), "survivors": len(survivors)}


# =========================================================================== shipped plane
def child_shipped_membership(workers: int, warmup: int, device: str = "cpu") -> dict:
    """squall's collective plane as the run loop drives it (CollectivePlane and WorkerPool on
    cloud=local): the wall time of one call of worker.steps_per_call steps as it is, with a
    member SIGKILLed just before it (its all-reduce fails, the group re-forms over the
    survivors, the steps run again), and with a replacement that joins (the newest state
    goes to it, the group re-forms)."""
    from cloud import make_pool
    from orchestrator.collective import CollectivePlane
    from orchestrator.config import job_spec
    from orchestrator.run import start_workers

    torch.set_num_threads(1)
    cfg = job(workers, device)
    workload = resolve_workload(cfg)
    info = data_info(workload.dataset("test"))
    torch.manual_seed(cfg.seed)
    plane = CollectivePlane(cfg, workload.model(info))
    start_ray(workers + 1)  # a CPU for the replacement
    pool = make_pool(cfg.cloud, job_spec(cfg))
    pool_workers = start_workers(cfg, pool, workload, info, plane)
    size, step = cfg.worker.steps_per_call, 1

    def call() -> float:
        nonlocal step
        t0 = time.perf_counter()
        step += len(plane.run(range(step, step + size), pool_workers, []))
        return (time.perf_counter() - t0) * 1e3

    try:
        while step <= warmup:
            call()
        normal = median_ms([call() / 1e3 for _ in range(5)])
        victim = max(pool_workers.live)
        os.kill(pool_workers.live[victim][1].worker_pid, signal.SIGKILL)
        time.sleep(0.2)  # gone before the call
        lost_ms = call()
        t_wait = time.perf_counter()
        while len(pool_workers.live) < workers and time.perf_counter() - t_wait < 120:
            for machine in pool.poll(step).joined:
                pool_workers.add(machine)
            pool_workers.admit()
            time.sleep(0.02)
        start_s = time.perf_counter() - t_wait
        join_ms = call()
        after = median_ms([call() / 1e3 for _ in range(5)])
    finally:
        pool_workers.stop()
        pool.shutdown()
        ray.shutdown()
    return {"steps_per_call": size, "normal_ms": normal, "lost_ms": lost_ms,
            "replacement_start_s": start_s, "join_ms": join_ms, "after_ms": after,
            "groups": plane.groups}


def membership_table(runs: list[dict], workers: int) -> list[str]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return ["membership runs failed: " + "; ".join(r["error"] for r in runs)]
    size = ok[0]["steps_per_call"]

    def cell(key: str, scale: float = 1.0) -> str:
        values = [r[key] * scale for r in ok]
        return f"{statistics.median(values):.1f} ({fmt(values, 1)})"

    extra = {k: [r[k] - r["normal_ms"] for r in ok] for k in ("lost_ms", "join_ms")}
    return [
        f"### Membership change in the shipped plane ({workers} -> {workers - 1} -> "
        f"{workers} members)", "",
        f"One call of {size} steps (ms, median over {len(ok)} rounds, every round in "
        "brackets); the survivors' processes are never restarted.", "",
        "| call | ms | over a plain call |", "|---|---|---|",
        f"| plain (median of 5) | {cell('normal_ms')} | - |",
        f"| a member SIGKILLed just before: its all-reduce fails, the group re-forms over the "
        f"survivors, the steps run again | {cell('lost_ms')} | "
        f"{statistics.median(extra['lost_ms']):.1f} ({fmt(extra['lost_ms'], 1)}) |",
        f"| the replacement's first call: the newest state goes to it, the group re-forms "
        f"| {cell('join_ms')} | {statistics.median(extra['join_ms']):.1f} "
        f"({fmt(extra['join_ms'], 1)}) |",
        f"| after (median of 5) | {cell('after_ms')} | - |", "",
        f"For scale: the replacement worker took {cell('replacement_start_s')} s to start "
        "(process, imports, its shard, the model), in the background while the survivors "
        "trained; the call above is the part the run waits for.",
        *(["", "Failed rounds: " + "; ".join(r["error"] for r in runs if "error" in r)]
          if len(ok) < len(runs) else [])]


# =========================================================================== children
CHILDREN: dict[str, Callable[[argparse.Namespace], dict]] = {
    "ddp-rank": lambda a: child_ddp_rank(a.workers, a.rank, a.port, a.steps, a.device),
    "squall": lambda a: child_squall(a.workers, a.steps, "driver", a.device),
    "squall-collective": lambda a: child_squall(a.workers, a.steps, "collective", a.device),
    "shipped-membership": lambda a: child_shipped_membership(a.workers, a.warmup, a.device),
    "cgraph": lambda a: child_cgraph(a.workers, a.steps),
    "cgraph-agg": lambda a: child_cgraph_agg(a.workers, a.steps),
    "collective": lambda a: child_collective(a.workers, a.steps),
    "cgraph-fault": lambda a: child_cgraph_fault(a.workers, a.warmup),
    "collective-fault": lambda a: child_collective_fault(a.workers, a.warmup, False),
    "collective-fault-store": lambda a: child_collective_fault(a.workers, a.warmup, True),
}


def spawn(args: list[str]) -> subprocess.Popen:
    """This module in a child process of its own session (so that its Ray goes with it)."""
    return subprocess.Popen([sys.executable, "-m", "benchmarks.dataplane", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def collect(proc: subprocess.Popen) -> dict:
    """The child's RESULT, or {"error": ...}; whatever it left in its session is killed."""
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    finally:
        try:  # the child's session: leftover Ray processes, if any
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": child_failure(proc.returncode, err)}
    return json.loads(lines[-1][len("RESULT "):])


def child_failure(code: int, err: str) -> str:
    """How a child failed: its exit (a signal by name), and where its stderr was kept."""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    fd, path = tempfile.mkstemp(prefix="dataplane-child-", suffix=".err", dir="/tmp")
    with os.fdopen(fd, "w") as f:
        f.write(err)
    return f"{how} (its stderr: {path})"


def run_variant(kind: str, workers: int, s: Settings) -> dict:
    if kind == "ddp":
        return run_ddp(workers, s)
    args = ["--child", kind, "--workers", str(workers), "--steps", str(s.steps),
            "--warmup", str(s.warmup), "--device", s.device]
    return collect(spawn(args))


def child_main(args: argparse.Namespace) -> None:
    emit(CHILDREN[args.child](args))


# =========================================================================== measuring
@dataclass
class Round:
    ms: float | None  # ms/step after the warm-up (None: the round failed)
    loss: float | None  # mean loss over the last LOSS_TAIL steps
    phases: dict[str, float]
    error: str = ""


def as_round(result: dict, warmup: int) -> Round:
    if "error" in result:
        return Round(None, None, {}, result["error"])
    return Round(window_ms(result["ends"], warmup),
                 float(np.mean(result["losses"][-LOSS_TAIL:])), result.get("phases", {}))


def measure(s: Settings) -> tuple[dict[int, dict[str, list[Round]]],
                                  dict[int, dict[str, list[dict]]]]:
    """Rounds of every variant (interleaved, order rotated per round), then the
    membership-change runs; by worker count."""
    rounds: dict[int, dict[str, list[Round]]] = {}
    faults: dict[int, dict[str, list[dict]]] = {}
    keys = list(s.variants)
    for w in s.workers:
        rounds[w] = {k: [] for k in keys}
        for r in range(s.rounds):
            for kind in keys[r % len(keys):] + keys[:r % len(keys)]:
                rnd = as_round(run_variant(kind, w, s), s.warmup)
                rounds[w][kind].append(rnd)
                log(f"workers={w} round {r + 1} {kind}: "
                    + (f"{rnd.ms:.2f} ms/step, loss {rnd.loss:.3f}" if rnd.ms else rnd.error))
        faults[w] = {k: [] for k in FAULTS} if s.faults else {"shipped-membership": []}
        for r in range(s.rounds if not s.faults else 0):
            faults[w]["shipped-membership"].append(run_variant("shipped-membership", w, s))
            log(f"workers={w} round {r + 1} shipped-membership: "
                f"{json.dumps(faults[w]['shipped-membership'][-1])}")
        for r in range(s.rounds if s.faults else 0):
            for kind in FAULTS:
                faults[w][kind].append(run_variant(kind, w, s))
                log(f"workers={w} round {r + 1} {kind}: {json.dumps(faults[w][kind][-1])}")
    return rounds, faults


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# =========================================================================== report
def ratios(variant: list[Round], ddp: list[Round]) -> list[float]:
    """Per round: the variant's step rate / DDP's (= DDP ms / variant ms)."""
    return [d.ms / v.ms for v, d in zip(variant, ddp) if v.ms and d.ms]


def fmt(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def verdict(ratio: float | None) -> str:
    if ratio is None:
        return "no data"
    met = ratio >= TARGET
    return f"{'yes' if met else 'no'}: {ratio:.2f}x {'>=' if met else '<'} {TARGET}x"


def step_table(group: dict[str, list[Round]]) -> tuple[list[str], dict[str, float]]:
    """The main table, and the median ratio vs DDP of each variant."""
    lines = ["| variant | ms/step (median) | every round | step rate vs DDP (median) | "
             "every round | vs (b) | >= 0.9x DDP? | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    medians = {k: statistics.median([r.ms for r in v if r.ms]) for k, v in group.items()
               if any(r.ms for r in v)}
    found: dict[str, float] = {}
    for kind, label in VARIANTS.items():
        if kind not in group:
            continue
        rows = group[kind]
        ok = [r.ms for r in rows if r.ms]
        if not ok:
            lines.append(f"| {label} | failed | {rows[0].error if rows else ''} | | | | | |")
            continue
        rs = ratios(rows, group["ddp"])
        found[kind] = statistics.median(rs) if rs else float("nan")
        vs_squall = medians["squall"] / medians[kind] if "squall" in medians else float("nan")
        loss = statistics.median([r.loss for r in rows if r.loss is not None])
        lines.append(f"| {label} | **{medians[kind]:.2f}** | {fmt(ok)} | **{found[kind]:.2f}x** "
                     f"| {fmt(rs)} | {vs_squall:.2f}x | "
                     f"{'(reference)' if kind == 'ddp' else verdict(found[kind])} | {loss:.4f} |")
    return lines, found


def phase_table(group: dict[str, list[Round]]) -> list[str]:
    lines = ["| variant | phase | ms (median over rounds of per-step medians) |", "|---|---|---|"]
    for kind, rows in group.items():
        names = dict.fromkeys(k for r in rows for k in r.phases)
        for name in names:
            values = [r.phases[name] for r in rows if name in r.phases]
            lines.append(f"| {kind} | {name} | {statistics.median(values):.2f} |")
    return lines


def fault_cell(runs: list[dict], key: str) -> str:
    """Median ms (every round), or the distinct texts, of one field over the rounds that
    did not fail."""
    ok = [r for r in runs if "error" not in r]
    values = [r[key] for r in ok if isinstance(r.get(key), float)]
    if values:
        return f"{statistics.median(values):.1f} ms ({fmt(values, 1)})"
    return " / ".join(dict.fromkeys(str(r.get(key) or "-") for r in ok)) or "-"


FAULT_ROWS = [  # (label, compiled graph field, collectives field); "" : not applicable
    ("for scale: initial compile / initial group formation", "form_ms", "form_ms"),
    ("kill -> the first survivor's all-reduce fails", "", "first_detect_ms"),
    ("kill -> error raised where the steps run (every survivor)", "detect_ms", "detect_ms"),
    ("what was raised", "raised", "raised"),
    ("where (compiled graph) / the victim's call (collectives)", "stage", "victim_call"),
    ("kill -> the driver knows", "detect_ms", "driver_knows_ms"),
    ("tear down the old graph / destroy_process_group (each survivor, as its all-reduce "
     "fails)", "teardown_ms", "destroy_ms"),
    ("errors of that", "teardown_error", "destroy_error"),
    ("recompile over the survivors / init_process_group (new world)", "rebuild_ms",
     "init_ms"),
    ("**whole re-form, as the driver sees it**", "reform_ms", "reform_ms"),
    ("first step after", "first_step_ms", "first_step_ms"),
    ("ms/step after (steady, the survivors)", "after_ms", "after_ms"),
]


def fault_table(faults: dict[str, list[dict]], workers: int) -> list[str]:
    cg, port, store = (faults[k] for k in FAULTS)
    lines = [f"| {workers} -> {workers - 1} members | (c) compiled graph | (d) gloo, new "
             "port per group (init_method tcp://) | (d) gloo, driver-hosted TCPStore, new "
             "key prefix per group |", "|---|---|---|---|"]
    lines += [f"| {label} | {fault_cell(cg, a) if a else 'n/a'} | {fault_cell(port, b)} | "
              f"{fault_cell(store, b)} |" for label, a, b in FAULT_ROWS]
    failed = [f"{kind} round {i + 1}: {r['error']}" for kind in FAULTS
              for i, r in enumerate(faults[kind]) if "error" in r]
    return lines + (["", "Failed rounds (left out above): " + "; ".join(failed)] if failed
                    else [])


def group_block(w: int, group: dict[str, list[Round]], faults: dict[str, list[dict]],
                s: Settings, cmd: str) -> str:
    steps, found = step_table(group)
    best = max((k for k in found if k != "ddp"), key=lambda k: found[k], default=None)
    meets = [k for k in found if k != "ddp" and found[k] >= TARGET]
    summary = (f"Fastest prototype: **{best}** at {found[best]:.2f}x DDP; meeting the "
               f">= {TARGET}x target: {', '.join(meets) or 'none'}." if best else "")
    heading = f"## {w} workers" + (": squall as shipped" if not s.faults else "") + (
        f", on {s.device}" if s.device != "cpu" else "")
    fault_part = [
        f"### Membership change: rank {VICTIM} of {w} SIGKILLed {KILL_AFTER_S:g} s into "
        "the run", "", f"Median over {s.rounds} rounds (every round in brackets); the "
        "actors of the survivors are not restarted.", "", *fault_table(faults, w)
    ] if s.faults else []
    return "\n".join([
        heading, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmd}`: steps {s.warmup + 1}-"
        f"{s.steps} of each run timed, {s.rounds} rounds per variant.",
        "", *steps, "", summary, "", "Where the time goes (per step, as measured inside):",
        "", *phase_table(group), *([""] + fault_part if fault_part else []),
        *([""] + membership_table(faults["shipped-membership"], w) if not s.faults else [])])


def header_block(cmd: str, load_before: tuple[float, ...], elapsed_s: float,
                 device: str = "cpu") -> str:
    after = os.getloadavg()
    return "\n".join([
        f"Last written {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmd}` from the repository "
        f"root, in {elapsed_s / 60:.1f} min.", "",
        f"- machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, Ray {ray.__version__}; load average (1/5/15 min) before "
        f"{fmt(list(load_before), 1)}, after {fmt(list(after), 1)}",
        "- job: squall's default (model=cnn, data=digits, batch 32 per worker, SGD lr 0.05 "
        "momentum 0.9, seed 0), the same model, shards and StepBatches in every variant, one "
        "torch thread per process, one CPU per worker (Ray: num_cpus = workers)",
        "- ms/step: wall time of the timed steps / their number, per round (a fresh process "
        "each); ratio: the variant's step rate / DDP's in the same round (above 1: faster "
        "than DDP); vs (b): (b)'s median ms / the variant's; final loss: mean over "
        f"the last {LOSS_TAIL} steps (sanity: every variant trains the same job)",
        *([f"- device: {torch.cuda.get_device_name(0)}, shared by every worker; DDP on gloo "
           "(NCCL refuses two ranks on one GPU), squall's collective plane on gloo with host "
           "copies (`group_backend`: its workers share the GPU)"]
          if device == "cuda" else [])])


def write_blocks(blocks: dict[str, str]) -> None:
    """Blocks `<!-- key -->...<!-- /key -->` (md_parts.write_part) inside the generated
    part; a block not there yet is placed before its end; the notes are kept."""
    if not MD.exists() or GENERATED not in MD.read_text():
        write_generated(MD, TITLE, "", NOTES_STUB)  # an empty generated part
    old = MD.read_text()
    for key in blocks:
        if f"<!-- {key} -->" not in old:
            old = old.replace(END_GENERATED,
                              f"<!-- {key} -->\n<!-- /{key} -->\n\n{END_GENERATED}")
    MD.write_text(old)
    for key, text in blocks.items():
        write_part(MD, TITLE, key, text)


# =========================================================================== main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="steps per run")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps at the start")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="2,4", help="comma-separated worker counts")
    p.add_argument("--shipped", action="store_true",
                   help="only DDP and squall's two planes, no membership runs; writes the "
                        "shipped-<workers> blocks")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 workers, 1 round, 60 steps; prints, writes no markdown")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda (with --shipped): DDP and squall's planes on the machine's GPU, "
                   "written to the shipped-cuda-<workers> blocks")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda" and not (args.shipped or args.child):
        p.error("--device cuda needs --shipped (the prototypes run on CPU only)")
    return args


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(steps=60, warmup=20, rounds=1, workers=(2,), quick=True,
                        variants=SHIPPED if args.shipped else tuple(VARIANTS),
                        faults=not args.shipped, device=args.device)
    workers = tuple(int(w) for w in args.workers.split(","))
    if args.shipped:
        return Settings(args.steps, args.warmup, args.rounds, workers, quick=False,
                        variants=SHIPPED, faults=False, device=args.device)
    return Settings(args.steps, args.warmup, args.rounds, workers, quick=False)


def main() -> None:
    args = parse_args()
    if args.child:
        args.workers = int(args.workers)
        child_main(args)
        return
    s = settings(args)
    cmd = invocation("benchmarks.dataplane")
    load_before, t0 = os.getloadavg(), time.perf_counter()
    rounds, faults = measure(s)
    prefix = "workers" if s.faults else "shipped" if s.device == "cpu" else f"shipped-{s.device}"
    blocks = {f"{prefix}-header": header_block(cmd, load_before, time.perf_counter() - t0,
                                               s.device)}
    blocks |= {f"{prefix}-{w}": group_block(w, rounds[w], faults[w], s, cmd)
               for w in s.workers}
    text = "\n\n".join(blocks.values())
    print(text)
    if s.quick:
        print(f"\n(--quick: {MD.name} not written)")
        return
    write_blocks(blocks)
    print(f"wrote {MD}")


if __name__ == "__main__":
    main()
