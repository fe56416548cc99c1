"""The worker actors that compute gradients, and the pool of them the training loop drives."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from cloud.pool import Machine, Pool
from orchestrator.config import Config, ConfigError
from orchestrator.data import StepBatches, shard_of
from orchestrator.models import flat_grads, float_buffers, share_flat, unflatten_into
from orchestrator.workload import DataInfo, Workload, to_device
from strategies.attacks import flip_labels
from strategies.rules import wire

# Parameters arrive as read-only numpy views of the object store; they are only read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass
class Calls:
    """Calls to the live workers in flight (WorkerPool.submit): ObjectRef -> rank, the
    payload refs of payload calls by rank, and the ranks already lost (reclaimed)."""

    pending: dict[ray.ObjectRef, int] = field(default_factory=dict)
    payloads: dict[int, ray.ObjectRef] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)


@dataclass
class GradientResult:
    rank: int
    grad: np.ndarray  # flat float32 gradient of the mini-batch loss, in the rule's wire format
    # (strategies.rules.Wire: uint8 packed signs for sign_vote)
    buffers: np.ndarray  # flat BatchNorm statistics after the forward pass (empty if none)
    loss: float

    @property
    def nbytes(self) -> int:
        return self.grad.nbytes + self.buffers.nbytes


class Replica:
    """What every worker actor holds: its shard of the training data, loaded in its own
    process through the data factory, and a model replica.

    A mistake in the user's workload (the factory raises, the shard cannot be made) does not
    kill the actor: `ready()` reports it, and the pool turns it into a one-line error.
    """

    def __init__(self, rank: int | None, workload: Workload, cfg: Config, info: DataInfo,
                 device: str, byzantine: bool = False) -> None:
        self.error = ""
        if rank is None:  # a standby (WorkerPool.keep_standby): set up later by assign()
            self._train_set = None
            with contextlib.suppress(Exception):  # a failing factory fails again in assign()
                self._train_set = workload.dataset("train")  # the same for every rank
            return
        torch.set_num_threads(max(1, int(cfg.worker.num_cpus)))
        self.rank, self.cfg, self.device = rank, cfg, torch.device(device)
        self.workload = workload
        self.flip = byzantine and cfg.byzantine.attack == "label_flip"  # the data-side attack
        self.num_classes = info.num_classes
        self.autocast = cfg.worker.precision == "bf16"
        try:
            train_set = self.__dict__.pop("_train_set", None)
            if train_set is None:
                train_set = workload.dataset("train")
            shard = shard_of(train_set, rank, cfg.workers, cfg.data, cfg.seed)
            self.batches = StepBatches(train_set, shard, cfg.data, cfg.seed, rank,
                                       cfg.worker.grad_accum, self.device.type == "cuda")
            torch.manual_seed(cfg.seed)  # the same initial model on every worker
            self.model = workload.model(info).to(self.device)
        except ConfigError as e:
            self.error = str(e)

    def ready(self) -> tuple[int, str]:
        """(process id, the workload's error or '')."""
        return os.getpid(), self.error

    def assign(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
        """A standby becomes the worker of a rank: the setup (data, model) its class skipped
        runs now, in a process whose imports are done. Answers like ready()."""
        type(self).__init__(self, *args, **kwargs)
        return self.ready()

    def backward(self, step: int) -> torch.Tensor:
        """Forward and backward on this step's micro-batches (their mean loss): the gradient
        accumulates into the parameters' .grad, which the caller zeroed."""
        self.model.train()
        micro = self.batches(step)
        total = torch.zeros((), device=self.device)
        for batch in micro:
            batch = to_device(batch, self.device, non_blocking=True)
            if self.flip:
                inputs, labels = batch
                batch = (inputs, flip_labels(labels, self.num_classes))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.workload.loss(self.model, batch) / len(micro)
            loss.backward()
            total += loss.detach().float()
        return total


    def evaluate(self, state: np.ndarray, batch_size: int) -> dict[str, float]:
        """eval.on=worker: the metrics of the model `state` (flat parameters and buffers) on
        the test split, which this worker loads the first time."""
        if not hasattr(self, "test_set"):
            self.test_set = self.workload.dataset("test")
        unflatten_into(state, list(self.model.parameters()) + float_buffers(self.model))
        return self.workload.evaluate(self.model, self.test_set, batch_size, self.device)


class Worker(Replica):
    """A parameter-server worker: the gradient of its mini-batch at the driver's parameters."""

    def __init__(self, rank: int | None, workload: Workload, cfg: Config, info: DataInfo,
                 device: str, byzantine: bool = False) -> None:
        super().__init__(rank, workload, cfg, info, device, byzantine)
        if rank is None or self.error:
            return
        self.params = list(self.model.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        # Parameters and buffers are views of one flat vector, the gradients of another: the
        # driver's state loads with one copy and the gradient leaves without a concatenation.
        self.state = share_flat(self.params + float_buffers(self.model))
        self.grad = flat_grads(self.params)
        self.encode = wire(cfg.strategy.name).encode  # e.g. sign_vote: 1 bit per value

    def gradient(self, state: np.ndarray, step: int) -> GradientResult:
        """Load the driver's parameters and buffers, return the gradient on this step's batch."""
        self.load(state)
        self.grad.zero_()
        loss = self.backward(step)
        return self.pack(loss, step)

    def load(self, state: np.ndarray) -> None:
        """The driver's flat parameters and buffers into the model (one copy)."""
        self.state.copy_(torch.from_numpy(state))

    def noised(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """strategy.noise (Chen et al. 2020): symmetric noise before the sign or the median,
        drawn from (seed, step, rank)."""
        noise = getattr(self.cfg.strategy, "noise", 0.0)
        if not noise:
            return grad
        gen = torch.Generator(device=self.device).manual_seed(
            self.cfg.seed * 1_000_003 + step * 1009 + self.rank)
        return grad + noise * torch.randn(grad.shape, generator=gen, device=self.device)

    def pack(self, loss: torch.Tensor, step: int) -> GradientResult:
        """The message to the driver: the flat gradient in the rule's wire format, and buffers."""
        payload = self.encode(self.noised(self.grad, step))
        # Views of this worker's vectors are safe to return: Ray copies a result into the
        # object store when the call returns, before the next call can change them.
        return GradientResult(self.rank, payload.cpu().numpy(),
                              self.state[self.n_params:].cpu().numpy(), loss.item())


RemoteWorker = ray.remote(Worker)


def worker_device(cfg: Config, machine_gpus: float | None) -> tuple[str, float]:
    """(device, GPUs) of a worker from worker.device and the GPUs of its machine (one
    worker per machine: it takes one GPU); where the pool cannot tell a machine's GPUs
    (None: a local or static cluster), a share of the cluster's GPUs."""
    if machine_gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        where, share = "the Ray cluster has", min(1.0, gpus / cfg.workers)
    else:
        gpus, where, share = machine_gpus, "its machine has", min(1.0, machine_gpus)
    if cfg.worker.device == "cuda" and gpus == 0:
        raise ConfigError(f"worker.device=cuda: {where} no GPU; use auto or cpu")
    if cfg.worker.device == "cpu" or gpus == 0:
        return "cpu", 0.0
    return "cuda", share


class WorkerPool:
    """The worker actors by rank (= data shard), each on a machine of the spot pool.

    Workers on machines that join later start in the background and take part from the first
    step after they are ready; a worker that dies or hangs is dropped and its machine replaced.
    A machine with a ready step (cloud.replace_delay_steps) holds its ready worker until that
    step (`admit(step)`); one that is ready only later joins then, and `join_summary` says by
    how many steps and seconds the replacements were late.
    """

    def __init__(self, cfg: Config, workload: Workload, info: DataInfo, pool: Pool,
                 step: Any) -> None:
        self.cfg, self.pool = cfg, pool
        # The TrainingStep (orchestrator/step.py): its actor class, and what a (re)starting
        # worker of a rank gets.
        self.step = step
        self.args = (ray.put(workload), cfg, info)  # each worker loads its own shard
        self.setup_errors: list[str] = []  # workload errors of replacements (they are dropped)
        self.live: dict[int, tuple[ray.actor.ActorHandle, Machine]] = {}
        self.starting: dict[ray.ObjectRef, tuple[int, ray.actor.ActorHandle, Machine]] = {}
        self.idle: list[Machine] = []  # machines without a worker (no vacant rank yet)
        self.booted: dict[int, tuple[ray.actor.ActorHandle, Machine]] = {}  # ready, not due
        self.standby: dict[str, ray.actor.ActorHandle] = {}  # the pool's standby node -> actor
        self.ready_at: dict[int, float] = {}  # machine id -> when its worker was ready
        # one entry per replacement that joined: (latency_s, late_steps, late_s); the late
        # figures are None for a machine without a ready step
        self.join_log: list[tuple[float, int | None, float | None]] = []
        self.held_s = 0.0  # wall time the step clock waited for replacements (wait_for_due)
        self.given_up = 0  # replacements due by this step are no longer waited for

    def start(self, machines: list[Machine]) -> None:
        """Start the first workers and wait until all of them are ready."""
        self.idle.extend(machines)
        self.fill()
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting),
                            timeout=self.cfg.worker.start_timeout_s)
        for ref in ready:  # the workload's own mistakes: one line, before any step
            _, error = ray.get(ref)
            if error:
                raise ConfigError(error)
        if len(ready) < len(machines):
            raise ConfigError(
                f"workers={self.cfg.workers} did not all start within worker.start_timeout_s="
                f"{self.cfg.worker.start_timeout_s:g}: each needs {self.cfg.worker.num_cpus:g} "
                f"CPU(s), the cluster has {ray.cluster_resources().get('CPU', 0):g}")
        self.admit()

    def joining(self) -> bool:
        """A replacement worker is starting, or ready and waiting for its step."""
        return bool(self.starting or self.booted)

    def add(self, machine: Machine) -> None:
        """A machine joined; it takes the next vacant rank (it waits as a spare until then)."""
        self.idle.append(machine)

    def fill(self) -> None:
        """Start workers on idle machines for the vacant ranks."""
        self.idle = [m for m in self.idle if m.id in self.pool.alive]
        taken = set(self.live) | set(self.booted) | {
            rank for rank, _, _ in self.starting.values()}
        for rank in sorted(set(range(self.cfg.workers)) - taken)[:len(self.idle)]:
            machine = self.idle.pop(0)
            device, gpus = worker_device(self.cfg, self.pool.machine_gpus(machine))
            args = (rank, *self.args, device)
            kwargs = self.step.actor_kwargs(rank, self)
            actor = self.standby.pop(self.pool.standby_key(machine), None)
            if actor is not None:  # its process is up and has imported everything
                self.starting[actor.assign.remote(*args, **kwargs)] = (rank, actor, machine)
                continue
            actor = self.step.actor_class.options(
                num_cpus=self.cfg.worker.num_cpus, num_gpus=gpus,
                **self.pool.placement(machine)).remote(*args, **kwargs)
            self.starting[actor.ready.remote()] = (rank, actor, machine)

    def keep_standby(self) -> None:
        """A standby actor (rank None: imports done, training split loaded) on each standby
        node the pool keeps (cloud.warm_nodes): the replacement that gets the node only makes
        its shard and model."""
        for key, (placement, machine_gpus) in self.pool.standby_nodes().items():
            if key not in self.standby:
                device, gpus = worker_device(self.cfg, machine_gpus)
                self.standby[key] = self.step.actor_class.options(
                    num_cpus=self.cfg.worker.num_cpus, num_gpus=gpus,
                    **placement).remote(None, *self.args, device)

    def admit(self, step: int | None = None) -> int:
        """Workers that finished starting join; returns how many did. With `step` (the step
        about to run), a worker whose machine has a ready step waits until `step` reaches it;
        without, every ready worker joins (the first workers, cloud=local)."""
        self.keep_standby()
        self.fill()
        now = time.monotonic()
        if self.starting:
            ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in ready:
                rank, actor, machine = self.starting.pop(ref)
                try:
                    machine.worker_pid, error = ray.get(ref)
                except (RayActorError, RayTaskError):  # its machine went away while it
                    ray.kill(actor, no_restart=True)  # started, or its setup raised
                    self.pool.lost(machine)
                    continue
                if error:  # e.g. its node could not fetch the data: the machine goes back
                    self._setup_failed(actor, machine, error)
                    continue
                self.booted[rank] = (actor, machine)
                self.ready_at[machine.id] = now
        joined = 0
        for rank, (actor, machine) in sorted(self.booted.items()):
            if machine.id not in self.pool.alive:  # reclaimed before its step
                del self.booted[rank]
                self.ready_at.pop(machine.id, None)
                ray.kill(actor, no_restart=True)
                continue
            due = machine.ready_step
            if step is not None and due is not None and step < due:
                continue  # ready early: it waits for its step
            del self.booted[rank]
            self.live[rank] = (actor, machine)
            joined += 1
            ready_at = self.ready_at.pop(machine.id, now)
            if step is None:
                continue  # the first workers are no replacements
            late_steps = late_s = None
            if due is not None:
                late_steps = max(0, step - due)
                late_s = max(0.0, ready_at - machine.due_at) if machine.due_at is not None \
                    and late_steps else 0.0
            self.join_log.append((ready_at - machine.joined_at, late_steps, late_s))
        return joined

    def due_steps(self) -> list[int]:
        """The steps from which the replacements on their way take part
        (cloud.replace_delay_steps): asked for or booting in the pool, or their worker
        starting or waiting here."""
        here = [m.ready_step for _, _, m in self.starting.values()]
        here += [m.ready_step for _, m in self.booted.values()]
        return self.pool.due_steps() + [s for s in here if s is not None]

    def wait_for_due(self, step: int) -> int:
        """Before `step` is polled: hold the step clock until every replacement due by it
        is ready to take part (a boot that outlasts its d steps), for at most the pool's
        join_wait_s; those still missing then join late, unwaited for. Returns how many
        joined; the wait is summed in held_s."""
        limit = self.pool.join_wait_s
        start = time.monotonic()
        joined = 0
        while limit > 0 and any(self.given_up < due <= step for due in self.due_steps()):
            if time.monotonic() - start >= limit:
                self.given_up = step
                break
            time.sleep(0.01)
            for machine in self.pool.arrivals():
                self.add(machine)
            joined += self.admit(step)
        self.held_s += time.monotonic() - start
        return joined

    def _setup_failed(self, actor: ray.actor.ActorHandle, machine: Machine, error: str) -> None:
        """A replacement whose workload failed to load: logged once per message, its machine
        given back like a lost one (the pool replaces it)."""
        if error not in self.setup_errors:
            warnings.warn(f"a replacement worker could not start: {error}", stacklevel=2)
        self.setup_errors.append(error)
        ray.kill(actor, no_restart=True)
        self.pool.lost(machine)

    def join_summary(self) -> dict:
        """The replacements that joined in this run (since its start or resume):
        join_latency_s_mean, from the machine's launch to its worker being ready (node start,
        worker process, imports, data); and with cloud.replace_delay_steps, joins_late (how
        many took part after their step), join_late_steps_mean and join_late_s_mean (steps and
        seconds beyond the step, 0 for one on time), and clock_held_s (the wall time the step
        clock waited for them, cloud.join_wait_s)."""
        log = self.join_log
        late = [(steps, s) for _, steps, s in log if steps is not None]
        out = {"join_latency_s_mean": float(np.mean([t for t, _, _ in log])) if log else 0.0}
        if late or getattr(self.pool, "delay_steps", None) is not None:
            out.update(joins_late=sum(1 for steps, _ in late if steps > 0),
                       join_late_steps_mean=float(np.mean([n for n, _ in late])) if late else 0.0,
                       join_late_s_mean=float(np.mean([s for _, s in late])) if late else 0.0,
                       clock_held_s=self.held_s)
        return out

    def drain(self, machines: list[Machine]) -> int:
        """Workers on machines under notice leave cleanly: no more steps, process exits."""
        ids = {m.id for m in machines}
        drained = [rank for rank, (_, m) in self.live.items() if m.id in ids]
        for rank in drained:
            actor, _ = self.live.pop(rank)
            actor.__ray_terminate__.remote()
        for ref, (_, _, m) in list(self.starting.items()):
            if m.id in ids:
                del self.starting[ref]
        for rank, (actor, m) in list(self.booted.items()):
            if m.id in ids:
                del self.booted[rank]
                actor.__ray_terminate__.remote()
        return len(drained)

    def stop(self) -> None:
        """End every worker now, so that their CPUs are free at once for what runs next in
        this Ray session (gossip workers hold handles to each other: left to Ray, they
        outlived their run by seconds, and the next run's workers waited for their CPUs)."""
        actors = [a for a, _ in self.live.values()] + [a for _, a, _ in self.starting.values()]
        for actor in actors + [a for a, _ in self.booted.values()] + list(self.standby.values()):
            ray.kill(actor, no_restart=True)
        self.live.clear()
        self.starting.clear()
        self.booted.clear()
        self.standby.clear()

    def evaluate(self, state: np.ndarray, batch_size: int) -> dict[str, float]:
        """eval.on=worker: the metrics of `state` computed by the live worker of the lowest
        rank ({} when none answers within worker.step_timeout_s)."""
        for rank in sorted(self.live):
            ref = self.live[rank][0].evaluate.remote(state, batch_size)
            ready, _ = ray.wait([ref], timeout=self.cfg.worker.step_timeout_s)
            try:
                return ray.get(ready[0]) if ready else {}
            except RayActorError:  # it died meanwhile: the next step drops it; try another
                continue
        return {}

    def gradients(self, state_ref: ray.ObjectRef, step: int,
                  reclaim: list[Machine]) -> tuple[list[GradientResult], int]:
        """Every live worker's gradient on the published parameters, sorted by rank, and how
        many workers were lost."""
        results, lost = self.call("gradient", (state_ref, step), reclaim)
        return [results[rank] for rank in sorted(results)], lost

    def reclaim(self, machines: list[Machine]) -> int:
        """These machines vanish now, before the next call: their workers leave (how many)."""
        ids = {m.id for m in machines}
        gone = [rank for rank, (_, m) in self.live.items() if m.id in ids]
        for rank in gone:
            actor, _ = self.live.pop(rank)
            ray.kill(actor, no_restart=True)
        self.pool.reclaim(list(machines))
        return len(gone)

    def call(self, method: str, args: tuple | dict[int, tuple], reclaim: list[Machine] = (),
             payload: bool = False) -> tuple[dict[int, Any], int]:
        """Call `method` on every live worker with `args` (or args[rank]); machines in
        `reclaim` vanish while the calls are in flight (their answers are dropped). Returns the
        answers by rank and how many workers were lost (died, or silent for
        worker.step_timeout_s).

        With payload=True the method returns (payload, small info): the driver reads only the
        info and answers (payload ObjectRef, info), so the payload can go from worker to
        worker without passing through the driver."""
        calls = self.submit(method, args, reclaim, payload)
        return self.collect(calls, self.cfg.worker.step_timeout_s)

    def submit(self, method: str, args: tuple | dict[int, tuple], reclaim: list[Machine] = (),
               payload: bool = False) -> Calls:
        """The first half of `call`: the calls go out and the machines in `reclaim` vanish."""
        calls = Calls()
        for rank, (actor, _) in self.live.items():
            rank_args = args[rank] if isinstance(args, dict) else args
            if payload:
                calls.payloads[rank], ref = getattr(actor, method).options(
                    num_returns=2).remote(*rank_args)
            else:
                ref = getattr(actor, method).remote(*rank_args)
            calls.pending[ref] = rank
        reclaimed = {m.id for m in reclaim}
        calls.lost = [rank for rank, (_, m) in self.live.items() if m.id in reclaimed]
        self.pool.reclaim(list(reclaim))
        return calls

    def collect(self, calls: Calls, timeout_s: float) -> tuple[dict[int, Any], int]:
        """The second half of `call`: the answers by rank, and how many workers were lost
        (they are dropped and their machines given back)."""
        pending, lost = calls.pending, calls.lost
        waiting = [ref for ref, rank in pending.items() if rank not in lost]
        ready, late = ray.wait(waiting, num_returns=len(waiting), timeout=timeout_s)
        lost += [pending[ref] for ref in late]
        try:  # one batched fetch from the object store
            answers = dict(zip(ready, ray.get(ready)))
        except RayActorError:  # a worker died after answering ray.wait: fetch one by one
            answers = {}
            for ref in ready:
                try:
                    answers[ref] = ray.get(ref)
                except RayActorError:
                    lost.append(pending[ref])
        results = {pending[ref]: (calls.payloads[pending[ref]], answer) if calls.payloads
                   else answer for ref, answer in answers.items()}
        for rank in lost:
            actor, machine = self.live.pop(rank)
            ray.kill(actor, no_restart=True)
            self.pool.lost(machine)
        return results, len(lost)
