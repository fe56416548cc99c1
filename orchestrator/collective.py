"""The collective plane: the workers step on their own and all-reduce among themselves.

Every worker holds the model and the optimizer. One call from the driver runs a few steps
(worker.steps_per_call): per step each worker computes the gradient of its batch, the
group all-reduces it (gloo on CPU, NCCL on GPU) and every worker applies the same update,
so the replicas stay equal without the driver touching a byte of the step. The driver
handles control only: it forms the process group over the live workers (a TCPStore it
hosts, a new key prefix per group), hands the newest state to workers that lack it (a
joiner, a worker whose last call fell behind), pulls the state for evaluation and
checkpoints, and records each step from the losses that come back.

A member that dies in a call makes the others' all-reduce fail: they leave the group and
return the steps they completed (its optimizer step is not applied, BatchNorm statistics
are put back), the driver drops the dead member, re-forms the group over the survivors in
the same processes and runs the failed steps again. The arithmetic is the driver plane's
with strategy=mean (orchestrator/parameter_server.py): mean of the gradients, clipping,
the learning-rate schedule, the optimizer, the mean of the BatchNorm statistics; the
checkpoint layout is the same, so a run can resume on either plane.

If every worker that held the newest state is lost at once, training goes on from the
driver's copy (the last checkpoint, evaluation or resume) and a warning names its step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from orchestrator.config import Config, plain_mean
from orchestrator.models import float_buffers
from orchestrator.optimizer import build_optimizer, clip_by_norm, lr_at
from orchestrator.parameter_server import Aggregation
from orchestrator.step import StepOutcome, TooFewWorkers
from orchestrator.workers import Calls, Worker, worker_device
from strategies.attacks import byzantine_ranks
from strategies.blocks import Block, on_block
from strategies.blocks import current as current_block
from strategies.preaggregation import preaggregation_chain
from strategies.rules import DENSE, Wire, build_rule, wire

if TYPE_CHECKING:
    from cloud.pool import Machine
    from orchestrator.workers import WorkerPool
    from orchestrator.workload import DataInfo, Workload

log = logging.getLogger(__name__)


# A step's phases on the workers (metrics.jsonl, the mean over the members): forward and
# backward; the collectives (including the wait for the slowest member); the rule on this
# member's block (the robust path); the optimizer.
PHASES = ("compute_s", "exchange_s", "rule_s", "update_s")


class PhaseClock:
    """Time stamps of a step's phases: perf_counter on the CPU; on a GPU, CUDA events, read
    (the one wait for the device) when the step's times are taken."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def to_cpu(state: Any) -> Any:
    """A state dict with every tensor on the CPU (what travels to the driver)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def ring_bytes(members: int, nbytes: int) -> int:
    """Bytes all members together send (and receive) in a ring all-reduce of `nbytes` each:
    2 (n - 1) / n of the vector per member."""
    return 2 * (members - 1) * nbytes


class CollectiveWorker(Worker):
    """A worker of the collective plane: its model, its optimizer, its place in the group."""

    def __init__(self, rank: int | None, workload: Workload, cfg: Config, info: DataInfo,
                 device: str, byzantine: bool = False) -> None:
        super().__init__(rank, workload, cfg, info, device, byzantine)
        if rank is None or self.error:
            return
        self.optimizer = build_optimizer(cfg.optim, self.params)
        self.buffers = self.state[self.n_params:]  # BatchNorm statistics (may be empty)
        # the robust path: a rule, attack, pre-aggregation or noise on blocks of coordinates
        self.aggregation = Aggregation(cfg) if sharded(cfg) else None
        self.members: list[int] = [rank]  # the group's ranks (squall's), in group order
        self.store: dist.TCPStore | None = None
        self.timeout = timedelta(seconds=cfg.worker.step_timeout_s)
        self.backend = "gloo"  # the group's (see group_backend)
        self.extra_bytes = 0  # this step's traffic beyond the gradient's (see summed)
        self.clock = PhaseClock(self.device)
        self.rule_spans: list[tuple[Any, Any]] = []  # this step's time in the rule

    def enter(self, state: dict | None, host: str, port: int, prefix: str,
              members: list[int], backend: str = "gloo") -> str:
        """Take `state` (model and optimizer) if given, then join the group `prefix` of
        `members` over `backend` (leaving the previous group, if any); '' or why joining
        failed (a member that never came: the store times out after worker.step_timeout_s)."""
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.aggregation is not None:
                self.aggregation.state = state["aggregation"]
        self.leave()
        if self.store is None:
            self.store = dist.TCPStore(host, port, is_master=False, timeout=self.timeout)
        self.backend = backend
        try:
            dist.init_process_group(backend, store=dist.PrefixStore(prefix, self.store),
                                    rank=members.index(self.rank), world_size=len(members),
                                    timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - reported: the driver forms another group
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        self.members = members
        return ""

    def leave(self) -> None:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group may fail to close
                dist.destroy_process_group()

    def export(self) -> dict:
        """Model, optimizer and aggregation state (e.g. centered clipping's previous
        aggregate), on the CPU."""
        return {"model": to_cpu(self.model.state_dict()),
                "optimizer": to_cpu(self.optimizer.state_dict()),
                "aggregation": to_cpu(self.aggregation.state) if self.aggregation else None}

    def run_steps(self, first: int, stop: int) -> dict:
        """Steps first..stop-1: per completed step its loss, whether the model moved and
        the gradients rejected as non-finite; `error` ('') when a member was lost (the failed
        step leaves no trace in this worker's state), `too_few` when strategy.on_too_few=fail
        stopped the steps."""
        out: dict[str, Any] = {"losses": [], "updated": [], "rejected": [], "extra_bytes": [],
                               "phases": [], "error": "", "too_few": ""}
        for step in range(first, stop):
            self.extra_bytes, self.rule_spans = 0, []
            saved = self.buffers.clone()  # the forward pass moves BatchNorm statistics
            rejected = self.aggregation.rejected if self.aggregation else 0
            t0 = self.clock.now()
            self.grad.zero_()
            loss = self.backward(step)
            t1 = self.clock.now()
            try:
                updated = self.exchange(step)
            except TooFewWorkers as e:
                out["too_few"] = str(e)
                break
            except Exception as e:  # noqa: BLE001 - a member is gone: the driver re-forms
                self.buffers.copy_(saved)
                self.leave()  # closing our connections frees members still waiting on us
                out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                break
            t2 = self.clock.now()
            if updated:
                self.apply(step)
            else:  # a skipped step: the statistics stay as the model's were
                self.buffers.copy_(saved)
            rule = sum(self.clock.seconds(a, b) for a, b in self.rule_spans)
            out["phases"].append((self.clock.seconds(t0, t1),
                                  self.clock.seconds(t1, t2) - rule, rule,
                                  self.clock.seconds(t2, self.clock.now())))
            out["losses"].append(float(loss))
            out["updated"].append(updated)
            out["rejected"].append((self.aggregation.rejected if self.aggregation else 0)
                                   - rejected)
            out["extra_bytes"].append(self.extra_bytes)
        return out

    def exchange(self, step: int) -> bool:
        """The group's update direction into self.grad (False: the step is skipped), and
        the mean of the BatchNorm statistics into the buffers. With gloo on a GPU worker
        (a GPU shared with other members, or a group of mixed devices) the collectives run
        on host copies."""
        world, staged = len(self.members), self.backend == "gloo" and self.device.type != "cpu"
        if self.buffers.numel():
            buffers = self.buffers.cpu() if staged else self.buffers
            dist.all_reduce(buffers)
            self.buffers.copy_(buffers.div_(world))
        grad = self.noised(self.grad, step) if self.aggregation else self.grad
        grad = grad.cpu() if staged else grad
        if self.aggregation is None:  # mean: one all-reduce
            dist.all_reduce(grad)
            self.grad.copy_(grad.div_(world))
            return True
        update = sharded_update(grad, self.members, self.rank,
                                lambda block: self.aggregate_block(block, step),
                                self.summed, wire(self.cfg.strategy.name))
        if update is None:
            return False
        self.grad.copy_(update)
        return True

    def aggregate_block(self, block: torch.Tensor, step: int) -> torch.Tensor | None:
        """The aggregation on this member's block of coordinates (`strategies.blocks`):
        per-coordinate state (tensors of d values, e.g. centered clipping's previous
        aggregate) goes in as its block and comes back whole (all-gathered), so that every
        member holds the whole state whatever the next group's blocks are."""
        n, where, width = len(self.members), current_block(), block.shape[1]
        whole = self.aggregation.state
        self.aggregation.state = per_coordinate(
            whole, where.d, lambda t: t[where.start:where.start + width].to(block.device))
        t0 = self.clock.now()
        try:
            update = self.aggregation(block, self.members, step, agree=agreed_rows)
            ours = self.aggregation.state
            self.rule_spans.append((t0, self.clock.now()))
        finally:
            self.aggregation.state = whole  # a failed step leaves no trace
        if update is not None:
            self.aggregation.state = per_coordinate(ours, width, lambda t: self.gathered(t, n))
        return update

    # The group's traffic beyond the gradient's exchange and the finite flags (what
    # CollectivePlane._traffic counts), all members together, in this step.
    def summed(self, partial: torch.Tensor) -> torch.Tensor:
        """`summed`, counted: a ring all-reduce's volume."""
        self.extra_bytes += ring_bytes(len(self.members), tensor_bytes(partial))
        return summed(partial)

    def gathered(self, block: torch.Tensor, n: int) -> torch.Tensor:
        """`gathered` of a block of the whole state, counted: each member's block to the
        n - 1 others."""
        whole = gathered(block, n, current_block().d)
        self.extra_bytes += (n - 1) * tensor_bytes(whole)
        return whole

    def apply(self, step: int) -> None:
        """The update of the group's direction, as the driver plane applies it."""
        optim = self.cfg.optim
        self.grad.copy_(clip_by_norm(self.grad, optim.clip_norm))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(optim, step, self.cfg.steps)
        self.optimizer.step()


def sharded_update(grad: torch.Tensor, members: list[int], rank: int,
                   rule: Callable[[torch.Tensor], torch.Tensor | None],
                   total: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   on_wire: Wire = DENSE) -> torch.Tensor | None:
    """A robust rule by blocks of coordinates, in the current group (this process is
    `rank` of `members`): an all-to-all leaves it with its block of every member's
    gradient, `rule` turns that (n, block) matrix into the block of the update (None: the
    step is skipped, which every member decides alike), and an all-gather returns the whole
    update. Each member sends and receives 2 (n - 1) / n of a gradient, as in a ring
    all-reduce, and computes the rule on 1/n of the coordinates. Sums over every
    coordinate inside the rule (a Gram matrix) go through `total` (default: `summed`).
    With a rule's own wire (`on_wire`, sign_vote's packed signs) the blocks travel encoded
    as the driver plane's gradients do, decoded by the member that aggregates them."""
    n, d = len(members), grad.numel()
    width = block_width(d, n, on_wire)
    send = torch.zeros(n * width, device=grad.device)
    send[:d] = grad
    rows = exchanged(on_wire.encode(send)).view(n, -1)
    lo = members.index(rank) * width
    with on_block(Block(lo, d, total or summed)):  # Gram matrices, global statistics
        update = rule(on_wire.decode(rows, width)[:, :max(0, min(width, d - lo))])
    return None if update is None else gathered(update, n, d, width)


def block_width(d: int, n: int, on_wire: Wire = DENSE) -> int:
    """Coordinates per member: ceil(d / n), a whole number of bytes of an encoded wire
    (a block of packed signs starts at a byte, so packing it alone gives the same bits)."""
    width = -(-d // n)
    return width if on_wire is DENSE else -(-width // 8) * 8


def exchanged(payload: torch.Tensor) -> torch.Tensor:
    """All-to-all of n equal chunks: chunk i of every member to member i."""
    out = torch.empty_like(payload)
    dist.all_to_all_single(out, payload)
    return out


def group_of(workers: WorkerPool) -> list[tuple[int, str]]:
    """(rank, machine id) of every live worker, by rank: who a group over them holds."""
    return [(rank, workers.live[rank][1].id) for rank in sorted(workers.live)]


def group_backend(cfg: Config, workers: WorkerPool, ranks: list[int]) -> str:
    """nccl when every member works on a GPU of its own; else gloo (NCCL refuses two members
    on one GPU and cannot reach a CPU member; GPU members then stage through host copies)."""
    devices = [worker_device(cfg, workers.pool.machine_gpus(workers.live[rank][1]))
               for rank in ranks]
    return "nccl" if all(kind == "cuda" and share >= 1 for kind, share in devices) else "gloo"


def gathered(block: torch.Tensor, n: int, d: int, width: int | None = None) -> torch.Tensor:
    """The whole vector of d values from every member's block of `width` (default: the
    dense blocks' ceil(d / n)) (all-gather)."""
    width = width or block_width(d, n)
    own = torch.zeros(width, dtype=block.dtype, device=block.device)
    own[:block.numel()] = block
    whole = torch.empty(n * width, dtype=block.dtype, device=block.device)
    dist.all_gather(list(whole.view(n, width).unbind(0)), own)
    return whole[:d]


def per_coordinate(state: Any, size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`state` with `fn` applied to its vectors of `size` values (its per-coordinate
    part); everything else as it is."""
    if isinstance(state, torch.Tensor):
        return fn(state) if state.dim() == 1 and state.numel() == size else state
    if isinstance(state, dict):
        return {k: per_coordinate(v, size, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(per_coordinate(v, size, fn) for v in state)
    return state


def summed(partial: torch.Tensor) -> torch.Tensor:
    """The group's sum of a partial sum (the same on every member)."""
    out = partial.clone()
    dist.all_reduce(out)
    return out


def agreed_rows(finite: torch.Tensor) -> torch.Tensor:
    """A row is finite where it is finite in every member's block."""
    flags = finite.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags.bool()


def sharded(cfg: Config) -> bool:
    """Whether the collective plane runs the robust path (else: a plain mean)."""
    return not plain_mean(cfg)


RemoteCollectiveWorker = ray.remote(CollectiveWorker)


class CollectivePlane:
    """The `TrainingStep` of worker.plane=collective: the workers own model and optimizer
    (and, on the robust path, the aggregation); the driver's copy (`model`, `optimizer`) is
    pulled for evaluation, checkpoints and the end of the run."""

    actor_class = RemoteCollectiveWorker
    checkpoint_before_drain = False  # every member holds the whole state

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        self.cfg, self.model = cfg, model
        self.optimizer = build_optimizer(cfg.optim, list(model.parameters()))
        self.steps_per_call = cfg.worker.steps_per_call
        self.d = sum(p.numel() for p in model.parameters())
        self.buffer_bytes = 4 * sum(b.numel() for b in float_buffers(model))
        self.nbytes = 4 * self.d + self.buffer_bytes  # what each member exchanges per step
        self.robust = sharded(cfg)
        byz = cfg.byzantine
        self.byzantine = set(byzantine_ranks(cfg.workers, byz.f, cfg.seed))
        self.rejected = 0  # gradients rejected as non-finite (as the driver plane counts)
        self.too_few = ""  # strategy.on_too_few=fail: why the workers stopped
        # the current group: (rank, machine id) of each member in group order. Machine ids,
        # not ranks alone: a replacement takes its predecessor's rank in a new process
        self.members: list[tuple[int, str]] = []
        self.newest: set[tuple[int, str]] = set()  # (rank, machine id): who holds the newest
        self.driver_current = True  # the driver's copy is the newest (start, resume, pull)
        # the aggregation's state (the driver plane's layout; on the robust path the workers'
        # is pulled with the model)
        st = cfg.strategy
        self.aggregation_state = preaggregation_chain(st.pre, st, build_rule(st.name, st)).init()
        self.store: dist.TCPStore | None = None
        self.groups = 0
        self.backend = ""  # the last group's: gloo or nccl
        self.in_flight: tuple[range, Calls] | None = None

    def actor_kwargs(self, rank: int, workers: WorkerPool | None) -> dict[str, Any]:
        return {"byzantine": rank in self.byzantine}

    # ---- the steps
    def run(self, steps: range, workers: WorkerPool, reclaim: list[Machine]
            ) -> list[StepOutcome]:
        """The steps with the live workers; fewer outcomes than steps when a member was lost
        (the frame asks for the rest again). Machines in `reclaim` vanish first."""
        # The simulated pool's reclaims go first: the step runs without them, as on the
        # driver plane. (A member that dies during a call is handled below.)
        lost, synced = workers.reclaim(reclaim), 0
        while workers.live:
            if self.too_few:
                raise TooFewWorkers(self.too_few)
            formed = self._form_group(workers)
            lost, synced = lost + formed[0], synced + formed[1]
            if not workers.live:
                break
            self.in_flight = (steps, workers.submit("run_steps", (steps.start, steps.stop)))
            outcomes, lost_now = self._collect(workers)
            lost += lost_now
            if outcomes:
                outcomes[0].lost += lost
                outcomes[0].bytes_down += synced
                return outcomes
        return [StepOutcome(answered=0, lost=lost, bytes_down=synced)]

    def settle(self, workers: WorkerPool | None) -> list[tuple[int, StepOutcome]]:
        """On a stop: the steps of the call in flight, finished (the model and the frame's
        progress must agree before the checkpoint)."""
        if self.in_flight is None or workers is None:
            return []
        first = self.in_flight[0].start
        outcomes, _ = self._collect(workers)
        return list(enumerate(outcomes, start=first))

    def _collect(self, workers: WorkerPool) -> tuple[list[StepOutcome], int]:
        steps, calls = self.in_flight
        timeout = self.cfg.worker.step_timeout_s
        waiting = [ref for ref, rank in calls.pending.items() if rank not in calls.lost]
        ray.wait(waiting, num_returns=1, timeout=timeout * len(steps))  # the first answer:
        # the others are at most a step behind it (or stuck in an all-reduce that times out
        # after worker.step_timeout_s); a member silent beyond that is lost
        results, lost = workers.collect(calls, 2 * timeout)
        self.in_flight = None
        done = max((len(r["losses"]) for r in results.values()), default=0)
        errors = [r["error"] for r in results.values() if r["error"]]
        if errors or lost:
            self.members = []  # the group is broken: it re-forms before the next call
            if not done and not lost:
                raise RuntimeError(f"the collective plane failed with every member live: "
                                   f"{errors[0]}")
        self.too_few = next((r["too_few"] for r in results.values() if r["too_few"]), "")
        if not done:
            self.newest &= set(group_of(workers))
            return [], lost
        self.newest = {(rank, workers.live[rank][1].id) for rank, r in results.items()
                       if len(r["losses"]) == done and rank in workers.live}
        self.driver_current = False
        longest = next(r for r in results.values() if len(r["losses"]) == done)
        outcomes = []
        for i in range(done):
            losses = [r["losses"][i] for r in results.values() if len(r["losses"]) > i]
            traffic = self._traffic(len(losses)) + longest["extra_bytes"][i]
            self.rejected += longest["rejected"][i]
            phases = np.mean([r["phases"][i] for r in results.values()
                              if len(r["phases"]) > i], axis=0)
            outcomes.append(StepOutcome(answered=len(losses), loss=float(np.mean(losses)),
                                        updated=longest["updated"][i], bytes_sent=traffic,
                                        bytes_up=traffic, bytes_down=traffic,
                                        metrics=dict(zip(PHASES, map(float, phases)))))
        return outcomes, lost

    def _traffic(self, members: int) -> int:
        """Bytes all members send (= receive) in a step: the ring all-reduce of the
        gradient and statistics; on the robust path the all-to-all and all-gather of the
        gradient (the same volume; with sign_vote's wire, the all-to-all carries 1 bit per
        value) and the all-reduce of the members' finite flags. The workers count the rest
        per step (`CollectiveWorker.extra_bytes`: Gram matrices, attack statistics,
        per-coordinate state)."""
        if not self.robust:
            return ring_bytes(members, self.nbytes)
        flags = ring_bytes(members, 4 * members)
        on_wire = wire(self.cfg.strategy.name)
        if on_wire is DENSE:
            return ring_bytes(members, self.nbytes) + flags
        width = block_width(self.d, members, on_wire)  # packed signs out, float32 back
        blocks = members * (members - 1) * (width // 8 + 4 * width)
        return blocks + ring_bytes(members, self.buffer_bytes) + flags

    # ---- membership
    def _form_group(self, workers: WorkerPool) -> tuple[int, int]:
        """A group over the live workers (unless the current one is it), every member with
        the newest state; returns (workers lost meanwhile, bytes of state sent)."""
        lost = synced = 0
        while workers.live and group_of(workers) != self.members:
            live = sorted(workers.live)
            holders = self._holders(workers)
            if not holders:  # the driver's copy is the newest left
                self._fall_back()
            needs = [rank for rank in live if rank not in holders]
            state = self._newest_state(workers) if needs else None
            ref = ray.put(state) if needs else None
            host, port = self._rendezvous()
            self.groups += 1
            self.backend = backend = group_backend(self.cfg, workers, live)
            args = {rank: (ref if rank in needs else None, host, port,
                           f"group{self.groups}/", live, backend) for rank in live}
            # members wait up to step_timeout_s for a missing one: the rest answer before
            # the driver gives up on it
            answers, lost_now = workers.collect(workers.submit("enter", args),
                                                2 * self.cfg.worker.step_timeout_s)
            lost += lost_now
            synced += len(needs) * tensor_bytes(state)
            self.newest |= {member for member in group_of(workers) if member[0] in needs}
            errors = [error for error in answers.values() if error]
            if errors and not lost_now:  # nobody to drop: another try would fail alike
                raise RuntimeError(f"the collective plane could not form its group: "
                                   f"{errors[0]}")
            if not lost_now:
                self.members = group_of(workers)
        return lost, synced

    def _holders(self, workers: WorkerPool) -> set[int]:
        """Live ranks whose worker (this process, not an earlier one of the rank) holds the
        newest state."""
        return {rank for rank, machine in group_of(workers) if (rank, machine) in self.newest}

    def _newest_state(self, workers: WorkerPool) -> dict:
        """The state of a live member that holds the newest, else the driver's copy."""
        for rank in sorted(self._holders(workers)):
            actor, _ = workers.live[rank]
            try:
                return ray.get(actor.export.remote(), timeout=self.cfg.worker.step_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # it is dropped at the next call
        self._fall_back()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "aggregation": self.aggregation_state}

    def _fall_back(self) -> None:
        """No live member holds the newest state: the driver's copy is what goes on."""
        if not self.driver_current:
            log.warning("every worker holding the newest model was lost: training goes on "
                        "from the driver's copy (the last checkpoint, evaluation or resume)")
        self.newest, self.driver_current = set(), True

    def _rendezvous(self) -> tuple[str, int]:
        """Where the groups meet: a TCPStore in the driver's process, on the driver's node."""
        host = ray.util.get_node_ip_address()
        if self.store is None:
            self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=self.cfg.worker.step_timeout_s))
        return host, self.store.port

    # ---- the driver's copy
    def _pull(self, workers: WorkerPool | None) -> None:
        """The newest state into the driver's model and optimizer (if a member holds it)."""
        if workers is None or self.driver_current:
            return
        for rank in sorted(self._holders(workers)):
            actor, _ = workers.live[rank]
            try:
                state = ray.get(actor.export.remote(), timeout=self.cfg.worker.step_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.robust:
                self.aggregation_state = state["aggregation"]
            self.driver_current = True
            return

    def state_dict(self, workers: WorkerPool | None) -> dict[str, Any]:
        self._pull(workers)  # the layout of the driver plane's (ParameterServer) checkpoint
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "aggregation": self.aggregation_state, "rejected": self.rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aggregation_state = state["aggregation"]
        self.rejected = state["rejected"]

    def eval_model(self, workers: WorkerPool | None) -> torch.nn.Module:
        self._pull(workers)
        return self.model

    def finish(self, workers: WorkerPool | None) -> None:
        self._pull(workers)

    def summary(self) -> dict[str, Any]:
        return {"rejected_updates": self.rejected, "byzantine_ranks": sorted(self.byzantine),
                "plane": "collective", "groups_formed": self.groups, "backend": self.backend}
