"""cloud=simulated: a spot pool on this machine, made of real Ray nodes.

A local multi-node Ray cluster (ray.cluster_utils.Cluster): the head node runs the driver and is
never reclaimed; every machine is one more Ray node with the resource {"squall_worker": 1}, so
exactly one worker lands on it. A reclaim removes the node: its raylet and the worker's process
die, exactly as when a cloud takes an instance back. Replacements join as new nodes after
cloud.replace_delay_s.

With cloud.replace_delay_steps=d (which wins over replace_delay_s) the pool keeps one clock, the
step: a replacement asked for in step s (a reclaim, a notice; for a lost worker, the last step
polled) is started at once, node and worker, and takes part from step s + d + 1
(Machine.ready_step; WorkerPool.admit holds a worker that is ready before its step) -- the
slot is empty for exactly d steps, as in the planner's `slot_availability(q, steps, wait=d,
start=0)`. A replacement whose boot takes longer than d steps holds the step clock before its
step until it is ready, so that it is drawn in that step like every working machine
(WorkerPool.wait_for_due, at most cloud.join_wait_s; the wall time this adds is the summary's
clock_held_s); with cloud.join_wait_s=0, or past it, it joins late instead, and WorkerPool
counts by how much.

Preemption follows cloud.preempt_prob (each spot machine independently in each step, the
volatile-instances model) or a price trace against a bid (a machine lives while price <= bid;
trace time = cloud.time_scale x wall time). With cloud.notice_s the machine gets a notice that
long before its reclaim.

cloud.warm_nodes=k keeps k Ray nodes started ahead of any request (a warm standby, billed at the
spot price while it waits, never reclaimed while waiting): a replacement takes the oldest one
instead of booting a node, and another is started in its place. On each standby node the
WorkerPool keeps a standby actor whose process has started and imported everything; the
replacement's worker is that actor, which then only loads its shard and builds its model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cloud.config import JobSpec, SimulatedCloudConfig
from cloud.draws import spot_rng
from cloud.pool import Machine, PollResult, Pool
from cloud.traces import PriceTrace, load_trace
from conf.schema import ConfigError

WORKER_RESOURCE = "squall_worker"


class SimulatedPool(Pool):
    cloud: SimulatedCloudConfig

    def __init__(self, cloud: SimulatedCloudConfig, job: JobSpec) -> None:
        super().__init__(cloud, job)
        self.cluster: Cluster | None = None
        self.trace: PriceTrace | None = None
        if cloud.trace:
            try:
                self.trace = load_trace(cloud.trace, cloud.instance_type)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.bid = cloud.bid or cloud.on_demand_price
        self._trace_start: float | None = None
        # Adding a Ray node holds its caller ~1 s even with wait=False: nodes are added on this
        # thread, beside the training loop, the way a cloud boots machines while a job runs.
        self._node_starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squall-node")
        self._adding: dict[int, Future] = {}  # machine id -> its add_node call
        self._warm: deque[Future] = deque()  # cloud.warm_nodes: standby add_node calls
        self._polled_at: float | None = None  # cloud.reclaims_per_hour: the last poll
        self._step = 0  # the step of the last poll: replacements asked for now count from it
        self._due_steps: dict[str, list[int]] = {}  # market -> ready steps of its requests

    @property
    def delay_steps(self) -> int | None:
        """cloud.replace_delay_steps when on (>= 0), else None (the seconds-based delay)."""
        d = self.cloud.replace_delay_steps
        return d if d is not None and d >= 0 else None

    def _markets(self, n: int) -> list[str]:
        """cloud.on_demand_workers machines on demand (never reclaimed), the rest spot."""
        on_demand = min(n, self.cloud.on_demand_workers)
        return ["on_demand"] * on_demand + ["spot"] * (n - on_demand)

    # ---- Ray nodes
    def start(self, n: int) -> list[Machine]:
        if ray.is_initialized():
            raise ConfigError("cloud=simulated starts its own Ray cluster; call it without a "
                              "Ray session already running")
        machines = super().start(n)
        for machine in machines:  # the first machines are waited for
            self._node_of(machine)
        self._keep_warm()
        return machines

    def _connect(self) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": self.job.ray.dashboard})
        # Nodes are added on a helper thread (_provision), and Ray's exit hooks for a node set
        # signal handlers, which only the main thread may: the head keeps them (its reaper takes
        # the cluster down with a killed driver); added nodes are removed by shutdown().
        self.cluster._shutdown_at_exit = False
        self.workers_here = True
        # Reclaims kill raylets on purpose: keep Ray's per-node death reports off the terminal
        # (worker exceptions still reach the driver through ray.get).
        ray.init(address=self.cluster.address, logging_level=logging.WARNING,
                 log_to_driver=False, runtime_env=self.job.ray.runtime_env())

    def _add_node(self) -> Future:
        return self._node_starter.submit(
            self.cluster.add_node, num_cpus=max(1, round(self.job.worker_num_cpus)),
            num_gpus=self.cloud.node_gpus, resources={WORKER_RESOURCE: 1}, wait=False)

    def _provision(self, machine: Machine) -> None:
        """The machine's node: a warm standby when one is kept (it may still be booting),
        else a new one."""
        self._adding[machine.id] = self._warm.popleft() if self._warm else self._add_node()

    def _keep_warm(self) -> None:
        """Start standby nodes until cloud.warm_nodes are kept."""
        while len(self._warm) < self.cloud.warm_nodes:
            self._warm.append(self._add_node())

    def _ready(self, machine: Machine) -> bool:
        adding = self._adding.get(machine.id)
        if adding is not None and not adding.done():
            return False
        self._node_of(machine)
        return True

    def _node_of(self, machine: Machine) -> None:
        """Wait for the machine's add_node call (if still pending) and keep its node."""
        adding = self._adding.pop(machine.id, None)
        if adding is not None:
            machine.node = adding.result()

    def _remove(self, machine: Machine) -> None:
        """Everything on the machine dies at once: the worker's process (SIGKILL) and the Ray
        node. The node's raylet gets SIGTERM: a SIGKILLed raylet makes Ray print its last 20
        log lines to the driver's terminal, for every simulated reclaim."""
        if machine.worker_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(machine.worker_pid, signal.SIGKILL)
        self._node_of(machine)  # a machine reclaimed while booting
        if machine.node is not None:
            self.cluster.remove_node(machine.node, allow_graceful=True)
            machine.node = None

    def machine_gpus(self, machine: Machine) -> float:
        return float(self.cloud.node_gpus)

    def placement(self, machine: Machine) -> dict:
        return placement_on(machine.node.node_id)

    def standby_nodes(self) -> dict[str, tuple[dict, float]]:
        up = [f.result() for f in self._warm if f.done() and f.exception() is None]
        return {node.node_id: (placement_on(node.node_id), float(self.cloud.node_gpus))
                for node in up}

    def standby_key(self, machine: Machine) -> str | None:
        return machine.node.node_id if machine.node is not None else None

    def shutdown(self) -> None:
        super().shutdown()
        self._node_starter.shutdown(wait=True, cancel_futures=True)
        if self.cluster is not None:
            self.cluster.shutdown()

    # ---- preemption
    def poll(self, step: int) -> PollResult:
        self._step = step
        result = super().poll(step)
        now = time.monotonic()
        for machine in self.alive.values():  # replacements whose step has come
            if machine.ready_step is not None and machine.ready_step <= step and \
                    machine.due_at is None:
                machine.due_at = now
        for machine in list(self.alive.values()):  # notices whose time is up
            if machine.reclaim_at is not None and machine.reclaim_at <= now:
                self._reclaim(machine)
        for machine in self._doomed(step, now):
            machine.doomed_step = step
            if self.cloud.notice_s > 0:
                machine.reclaim_at = now + self.cloud.notice_s
                result.noticed.append(machine)
                self._request(machine.market, step)  # asked for at the notice
            else:
                result.reclaim_now.append(machine)
        return result

    def arrivals(self) -> list[Machine]:
        joined = super().arrivals()
        self._keep_warm()  # in place of those the replacements took
        return joined

    def due_steps(self) -> list[int]:
        if self.delay_steps is None:
            return []
        asked = [step for steps in self._due_steps.values() for step in steps]
        booting = [m.ready_step for m in self._booting if m.ready_step is not None]
        going = [m.doomed_step + self.delay_steps + 1 for m in self.alive.values()
                 if m.doomed_step is not None and m.reclaim_at is None]  # reclaims under way
        return asked + booting + going

    @property
    def join_wait_s(self) -> float:
        return self.cloud.join_wait_s if self.delay_steps is not None else 0.0

    def _doomed(self, step: int, now: float) -> list[Machine]:
        """Spot machines without a notice yet that the preemption model takes in this step."""
        spot = [m for m in self.alive.values() if m.market == "spot" and m.reclaim_at is None
                and m.doomed_step is None]
        if self.trace is None:  # each working spot worker independently, with probability q
            rng = spot_rng(self.job.seed, step)
            # a worker takes part from its machine's ready step: drawn from then on
            working = sorted((m for m in spot if m.worker_pid is not None and (
                m.ready_step is None or m.ready_step <= step)), key=lambda m: m.id)
            q = self.cloud.preempt_prob
            if self.cloud.reclaims_per_hour:  # the rate over the wall time since the last poll
                elapsed = now - (self._polled_at if self._polled_at is not None else now)
                q = reclaim_probability(self.cloud.reclaims_per_hour,
                                        elapsed * self.cloud.time_scale)
            self._polled_at = now
            return [m for m in working if rng.random() < q]
        t = self._trace_time(now)
        if self.trace.price_at(t) > self.bid:
            return spot
        rise = self.trace.next_change_above(t, self.bid)
        lead = self.cloud.notice_s * self.cloud.time_scale
        if rise is not None and self.cloud.notice_s > 0 and rise - t <= lead:
            return spot  # the price will pass the bid within the notice period
        return []

    # ---- prices
    def _trace_time(self, now: float) -> float:
        """Trace clock: starts with the first training step, runs time_scale x wall time."""
        if self._trace_start is None:
            self._trace_start = now
        return (now - self._trace_start) * self.cloud.time_scale

    def price(self, machine: Machine, now: float) -> float:
        if machine.market == "on_demand":
            return self.cloud.on_demand_price
        return self._spot_price(now)

    def _spot_price(self, now: float) -> float:
        if self.trace is not None:
            return self.trace.price_at(self._trace_time(now))
        return self.cloud.spot_price

    def _accrue(self, now: float) -> None:
        """Machines, and the standby nodes at the spot price."""
        if self._warm:
            hours = (now - self._accrued_at) / 3600
            self.cost_usd += len(self._warm) * self._spot_price(now) * hours
        super()._accrue(now)

    def on_demand_price(self) -> float:
        return self.cloud.on_demand_price

    def _replace_delay(self) -> float:
        return 0.0 if self.delay_steps is not None else self.cloud.replace_delay_s

    def _request(self, market: str, step: int | None = None) -> None:
        """With cloud.replace_delay_steps, the request remembers the step its machine's worker
        takes part from: d + 1 after `step`, the step its predecessor was taken in (else the
        last polled one); requests of a market are launched in order."""
        asked = len(self._requests)
        super()._request(market, step)
        if self.delay_steps is not None and len(self._requests) > asked:  # (not over max_nodes)
            taken = step if step is not None else self._step
            self._due_steps.setdefault(market, []).append(taken + self.delay_steps + 1)

    def _launch(self, markets: list[str]) -> list[Machine]:
        machines = super()._launch(markets)
        for machine in machines:  # the first machines have no ready step: they work at once
            due = self._due_steps.get(machine.market)
            if due:
                machine.ready_step = due.pop(0)
        return machines

    def _may_join(self, market: str, now: float) -> bool:
        """A spot request is fulfilled only while the price is at or below the bid."""
        if market == "on_demand" or self.trace is None:
            return True
        return self.trace.price_at(self._trace_time(now)) <= self.bid


def placement_on(node_id: str) -> dict:
    """Actor options that put the actor on that node, and only there."""
    return {"resources": {WORKER_RESOURCE: 1},
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def reclaim_probability(per_hour: float, seconds: float) -> float:
    """The chance that a machine reclaimed at `per_hour` (a Poisson process) goes within
    `seconds` of pool time: 1 - exp(-rate t)."""
    return -math.expm1(-per_hour * seconds / 3600.0)
