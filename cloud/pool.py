"""Spot pools: which machines exist now, what they cost, and who is about to go.

Every pool speaks the same small protocol to the training loop:
  start(n)      provision n machines and connect Ray
  poll(step)    once per step: which machines joined, got a notice, or are reclaimed in this step
  lost(m)       the loop lost the worker on machine m (crash, hang): replace it
  placement(m)  Ray actor options that put a worker on machine m
  costs()       (cost so far, what the same wall time would cost on demand), in USD
  shutdown()
Machines are only reclaimed by the pool; replacements are requested automatically.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cloud.config import CloudConfig, JobSpec, RayConfig
from conf.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Machine:
    id: int
    market: str  # "spot" or "on_demand"
    joined_at: float  # time.monotonic()
    node: Any = None  # the pool's handle for it (a Ray node for the simulated pool)
    reclaim_at: float | None = None  # set once a notice was given
    worker_pid: int | None = None  # the worker process on it, once started
    # cloud.replace_delay_steps: the step from which its worker may take part (None: as soon
    # as it is ready), and when that step began (time.monotonic(), once it has)
    ready_step: int | None = None
    due_at: float | None = None
    doomed_step: int | None = None  # the step a preemption model took it in (reclaim under way)


@dataclass
class PollResult:
    joined: list[Machine] = field(default_factory=list)  # ready for a worker
    noticed: list[Machine] = field(default_factory=list)  # drain now, reclaimed at reclaim_at
    reclaim_now: list[Machine] = field(default_factory=list)  # reclaimed during this step


class Pool:
    """Machines that never vanish on their own: the local machine (cloud=local) or an existing
    cluster (cloud=static). A lost worker is replaced at once wherever Ray finds room."""

    def __init__(self, cloud: CloudConfig, job: JobSpec) -> None:
        self.cloud = cloud
        self.job = job
        self.alive: dict[int, Machine] = {}
        self._next_id = 0
        self._requests: list[tuple[float, str]] = []  # (ready_at, market) of replacements
        self._booting: list[Machine] = []  # launched (and billed), not ready for a worker yet
        self._accrued_at = time.monotonic()
        self._started_at = self._accrued_at
        self.cost_usd = 0.0
        self.machines_started = 0
        self.owns_ray = False  # True when the pool connected Ray (and so shuts it down)
        self.workers_here = False  # the workers compute on this machine's cores (local Ray)
        self.watchdog: subprocess.Popen | None = None  # ends the local Ray if the driver dies

    # ---- protocol
    def start(self, n: int) -> list[Machine]:
        if not ray.is_initialized():  # else: a session the caller already started
            self._connect()
            self.owns_ray = True
            if self.workers_here:  # a Ray started here, not a cluster joined
                self.watchdog = watch_local_ray()
        machines = self._launch(self._markets(n))
        self._accrued_at = self._started_at = time.monotonic()
        return machines

    def poll(self, step: int) -> PollResult:
        """The events of `step`: machines that joined, and (in pools that reclaim) those
        noticed or reclaimed in it."""
        return PollResult(joined=self.arrivals())

    def arrivals(self) -> list[Machine]:
        """Machines ready for a worker since the last call (replacement requests that are due
        are launched first). Draws no reclaims: the step clock may wait on it."""
        now = time.monotonic()
        self._accrue(now)
        due = [r for r in self._requests if r[0] <= now and self._may_join(r[1], now)]
        if due:
            self._requests = [r for r in self._requests if r not in due]
            self._booting += self._launch([market for _, market in due])
        self._booting = [m for m in self._booting if m.id in self.alive]
        joined = [m for m in self._booting if self._ready(m)]
        self._booting = [m for m in self._booting if m not in joined]
        return joined

    def due_steps(self) -> list[int]:
        """The steps from which the replacements this pool has yet to hand over take part
        (cloud.replace_delay_steps); none in pools without a step clock."""
        return []

    @property
    def join_wait_s(self) -> float:
        """How long the step clock may wait for a replacement due by the current step (0:
        it does not wait; pools without a step clock)."""
        return 0.0

    def reclaim(self, machines: list[Machine]) -> None:
        """Take these machines away now (called while their step is in flight)."""
        for machine in machines:
            if self._reclaim(machine):  # (not twice: lost, then reclaimed in its step)
                self._request(machine.market, machine.doomed_step)

    def _reclaim(self, machine: Machine) -> bool:
        """Take the machine away if it is still alive; whether it was."""
        if self.alive.pop(machine.id, None) is None:
            return False
        self._accrue(time.monotonic())
        self._remove(machine)
        return True

    def lost(self, machine: Machine) -> None:
        """The loop lost the worker on this machine (crash, hang): let it go, ask for another."""
        if machine.id in self.alive:
            self.reclaim([machine])

    def placement(self, machine: Machine) -> dict:
        return {}

    def standby_nodes(self) -> dict[str, tuple[dict, float | None]]:
        """Nodes kept up ahead of requests (cloud.warm_nodes), by key: the placement of an
        actor on each, and its GPUs. None here."""
        return {}

    def standby_key(self, machine: Machine) -> str | None:
        """The key in standby_nodes() of the node this machine got, if it was a standby."""
        return None

    def machine_gpus(self, machine: Machine) -> float | None:
        """The GPUs of the machine's node, None where the pool cannot tell (a worker then
        takes a share of the cluster's GPUs)."""
        return None

    def price(self, machine: Machine, now: float) -> float:
        """$/h of a machine; the local machine is free."""
        return 0.0

    def on_demand_price(self) -> float:
        return 0.0

    def costs(self) -> tuple[float, float]:
        self._accrue(time.monotonic())
        hours = (time.monotonic() - self._started_at) / 3600
        return self.cost_usd, self.job.workers * hours * self.on_demand_price()

    def shutdown(self) -> None:
        if self.owns_ray:
            ray.shutdown()
        if self.watchdog is not None:  # an orderly end: Ray's own shutdown ends its processes
            self.watchdog.terminate()
            self.watchdog.wait()
            self.watchdog.stdin.close()
            self.watchdog = None

    # ---- helpers for subclasses
    def _connect(self) -> None:
        ray_cfg = self.job.ray
        address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            join_cluster(ray_cfg, address)
        else:
            self.workers_here = True
            cpus = ray_cfg.num_cpus or max(
                os.cpu_count() or 1, math.ceil(self.job.workers * self.job.worker_num_cpus))
            ray.init(address="local", num_cpus=cpus, include_dashboard=ray_cfg.dashboard,
                     logging_level=logging.WARNING, runtime_env=ray_cfg.runtime_env())

    def _markets(self, n: int) -> list[str]:
        """The markets of the first n machines."""
        return ["spot"] * n

    def _launch(self, markets: list[str]) -> list[Machine]:
        """Start machines for these markets; returns them once they can take a worker."""
        machines = []
        for market in markets:
            machine = Machine(self._next_id, market, time.monotonic())
            self._next_id += 1
            self.machines_started += 1
            self._provision(machine)
            self.alive[machine.id] = machine
            machines.append(machine)
        return machines

    def _provision(self, machine: Machine) -> None:
        """Bring the machine up (nothing to do when Ray already has the capacity)."""

    def _ready(self, machine: Machine) -> bool:
        """Whether a launched machine has finished booting (it may take a worker)."""
        return True

    def _remove(self, machine: Machine) -> None:
        """Take the machine away (nothing to do for capacity the pool does not own)."""

    def _request(self, market: str, step: int | None = None) -> None:
        """Ask for a replacement machine in `market` (`step`: the step its predecessor was
        taken in, where the pool keeps a step clock)."""
        cap = self.cloud.max_nodes
        if cap and self.machines_started + len(self._requests) >= cap:
            log.warning("cloud.max_nodes=%d reached: no replacement machine", cap)
            return
        self._requests.append((time.monotonic() + self._replace_delay(), market))

    def _replace_delay(self) -> float:
        return 0.0

    def _may_join(self, market: str, now: float) -> bool:
        return True

    def _accrue(self, now: float) -> None:
        hours = (now - self._accrued_at) / 3600
        self.cost_usd += sum(self.price(m, now) for m in self.alive.values()) * hours
        self._accrued_at = now


class StaticPool(Pool):
    """An existing Ray cluster (ray.address / $RAY_ADDRESS): priced as on-demand machines."""

    def _connect(self) -> None:
        address = self.job.ray.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ConfigError("cloud=static needs the cluster's address: ray.address=<host:port> "
                              "or $RAY_ADDRESS")
        join_cluster(self.job.ray, address)

    def price(self, machine: Machine, now: float) -> float:
        return self.cloud.on_demand_price

    def on_demand_price(self) -> float:
        return self.cloud.on_demand_price


def join_cluster(ray_cfg: RayConfig, address: str) -> None:
    """ray.init on an existing cluster. An address where nothing listens, or a cluster with
    token authentication joined without RAY_AUTH_MODE=token, is a one-line error at once:
    ray.init itself retries (for minutes; for 20 s, with a warning a second), then raises
    with a traceback or a message that does not say why."""
    key = "ray.address" if ray_cfg.address else "$RAY_ADDRESS"
    host, _, port = address.rpartition(":")
    if address != "auto" and "://" not in address:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={address}: no Ray cluster answers there "
                              f"({getattr(e, 'strerror', None) or e}); start one with "
                              "`ray start --head` or fix the address") from None
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" and wants_token(address):
            raise ConfigError(f"{key}={address}: the cluster uses token authentication; set "
                              "RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    try:
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env=ray_cfg.runtime_env())
    except ConnectionError as e:
        raise ConfigError(f"{key}={address}: cannot join the Ray cluster there "
                          f"({str(e).splitlines()[0]})") from None


def wants_token(address: str, timeout_s: float = 10.0) -> bool:
    """Whether the GCS at host:port refuses a request without a token (Ray's token
    authentication): one gRPC call, as Ray's own client would make it first. Anything else
    (an answer, another error, no gRPC at hand) is False: ray.init then has its say."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return False
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False



# The watchdog of a local Ray session (see `watch_local_ray`): a process of its own (no Ray,
# no torch, only the standard library) that waits for EOF on stdin, i.e. for the driver to end,
# however it ends, then terminates whatever is left of the session: SIGTERM, and SIGKILL after
# a grace period (SIGTERM to the watchdog itself: the driver shut Ray down in order, nothing
# to do). A process belongs to the session when its command line names the session
# directory (GCS, raylet, monitors) or when it is a `ray::` process (agents, workers: their
# command line is their title) with a file open in that directory (its logs). Zombies and
# processes of other users are left alone.
_WATCHDOG = r"""
import os, signal, sys, time

session, driver, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
marks = ((session + "/").encode(), (session + "\0").encode())

def left():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (driver, os.getpid()):
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rindex(b")") + 2:].startswith(b"Z"):
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read() + b"\0"
            if any(mark in cmdline for mark in marks) or (cmdline.startswith(b"ray::") and any(
                    os.readlink(f"/proc/{name}/fd/{fd}").startswith(session + "/")
                    for fd in os.listdir(f"/proc/{name}/fd"))):
                found.append(int(name))
        except (OSError, ValueError):
            continue
    return found

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
while sys.stdin.buffer.read(65536):
    pass
deadline = time.monotonic() + grace
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in left():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    while sig == signal.SIGTERM and left() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def watch_local_ray(grace_s: float = 2.0) -> subprocess.Popen | None:
    """Start the watchdog of the local Ray session this process started (Linux; elsewhere
    None). Ray ties its processes to the driver's life (PR_SET_PDEATHSIG), but not the agents
    its raylet starts: when a SIGKILLed driver takes the raylet with it, DashboardAgent and
    RuntimeEnvAgent report the raylet's death to the GCS, which died too, and wait 60 s for
    it, ignoring SIGTERM meanwhile. The watchdog ends them (and anything else of the session)
    within `grace_s` of the driver's end; `Pool.shutdown` stops it after Ray's own."""
    node = getattr(ray._private.worker, "_global_node", None)
    if not sys.platform.startswith("linux") or node is None:
        return None
    session = os.path.realpath(node.get_session_dir_path())
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, session, str(os.getpid()), str(grace_s)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # Ctrl-C or a signal to the driver's group leaves it be
