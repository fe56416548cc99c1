"""The run frame, top to bottom: one training job of any strategy family.

The frame owns time: it resumes from the newest checkpoint, turns the spot pool's events
into workers joining and leaving, writes one metrics record per step, evaluates and
checkpoints on schedule, stops cleanly on Ctrl-C, and writes the summary. What one step
does belongs to the strategy family (`orchestrator.step.TrainingStep`): the parameter server
(orchestrator/parameter_server.py), the collective plane (orchestrator/collective.py) or the
gossip round (orchestrator/gossip.py). A family may run several steps per call (the
collective plane's workers step on their own): the frame polls the pool ahead for those
steps and ends a call before the first step with an event, an evaluation or a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Subset

from cloud import PollResult, Pool, make_pool
from orchestrator.checkpoint import (
    CheckpointError,
    CheckpointStore,
    InvalidCheckpointError,
    capture_rng_state,
    restore_rng_state,
)
from orchestrator.collective import CollectivePlane
from orchestrator.config import Config, ConfigError, job_spec, to_dict, uses_collective_plane
from orchestrator.gossip import GossipRound
from orchestrator.metrics import RunLog, make_run_dir
from orchestrator.models import model_vector
from orchestrator.parameter_server import ParameterServer
from orchestrator.step import StepOutcome, TooFewWorkers, TrainingStep
from orchestrator.workers import WorkerPool
from orchestrator.workload import DataInfo, Workload, data_info, resolve_workload, takes

# Settings that may change when a run resumes; anything else must match its checkpoint.
RESUMABLE_CHANGES = ("steps", "run", "log", "eval", "checkpoint", "ray", "worker", "cloud")
# Layout of the checkpoint state; another value (or none: squall 0.1) is refused on resume.
CHECKPOINT_FORMAT = 2


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: the run stops as on Ctrl-C (checkpoint, model, summary)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # stop signals seen (Ray's calls may re-raise a plain interrupt)


def _raise_stopped(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def handle_stop_signals(handler: object) -> dict:
    """Set the handler of SIGTERM (`kill`, `ray job stop`) and SIGHUP (a closed terminal);
    returns the previous ones. Only the main thread may (a run in a thread keeps them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


@dataclass
class Progress:
    """Everything the summary counts; saved in checkpoints so a resumed run continues it."""

    step: int = 0
    loss: float = math.nan
    bytes_sent: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_measure: int = 0
    skipped_steps: int = 0
    preemptions: int = 0
    joins: int = 0
    lost_steps: int = 0
    cost_usd: float = 0.0
    on_demand_cost_usd: float = 0.0
    wall_s: float = 0.0
    live: list[int] = field(default_factory=list)  # live workers in each step

    def count(self, step: int, outcome: StepOutcome) -> None:
        """Add what step `step` did."""
        self.step = step
        self.preemptions += outcome.lost
        if outcome.loss is not None:
            self.loss = outcome.loss
        if not outcome.updated:  # nobody (or too few) answered
            self.skipped_steps += 1
        self.live.append(outcome.answered)
        self.bytes_sent += outcome.bytes_sent
        self.bytes_up += outcome.bytes_up
        self.bytes_down += outcome.bytes_down
        self.bytes_measure += outcome.bytes_measure


def driver_data(cfg: Config, workload: Workload) -> tuple[Any, DataInfo]:
    """The test split (the driver evaluates: eval.on=driver) and what it tells of the data;
    with eval.on=worker the driver loads it only for a model factory that needs its
    input_shape or num_classes and is not given them in model.args."""
    needs_info = any(name not in cfg.model.args and takes(workload.model_fn, name)
                     for name in ("input_shape", "num_classes"))
    if cfg.eval.on == "worker" and not needs_info and cfg.byzantine.attack != "label_flip":
        return None, DataInfo()
    test_set = workload.dataset("test")
    return (test_set if cfg.eval.on == "driver" else None), data_info(test_set)


def check_workload(cfg: Config, workload: Workload, model: torch.nn.Module, test_set: Any,
                   info: DataInfo) -> None:
    """What the driver can check before any worker starts: the loss of one test batch, the
    default metrics on a few test samples and the eval target on the test split (model in
    eval mode: its statistics stay untouched)."""
    if cfg.byzantine.f and cfg.byzantine.attack == "label_flip" and info.num_classes is None:
        raise ConfigError("byzantine.attack=label_flip: the data set tells no number of "
                          "classes (a `classes` or `targets` attribute)")
    if test_set is None:
        return
    few = Subset(test_set, range(min(8, len(test_set))))
    batch = next(iter(DataLoader(few, batch_size=2)))
    model.eval()
    try:
        with torch.no_grad():
            workload.check_loss(model, batch)
        workload.evaluate(model, few, cfg.eval.batch_size, metric=False)
        if workload.metric_fn is not None:
            workload.metric(model, test_set)
    finally:
        model.train()


def evaluate(cfg: Config, workload: Workload, model: torch.nn.Module | None, test_set: Any,
             workers: WorkerPool | None) -> dict[str, float]:
    """The metrics of the model to evaluate now (eval.on: the driver, or a live worker);
    {} when there is none (no live replica, no live worker)."""
    if model is None:
        return {}
    if cfg.eval.on == "driver":
        return workload.evaluate(model, test_set, cfg.eval.batch_size)
    return workers.evaluate(model_vector(model), cfg.eval.batch_size) if workers else {}


def make_step(cfg: Config, model: torch.nn.Module) -> TrainingStep:
    """The strategy family's step: decentralized gossip, the collective plane (the workers
    all-reduce the mean among themselves) or the parameter server (every rule on the driver)."""
    if cfg.strategy.name == "gossip":
        return GossipRound(cfg, model)
    if uses_collective_plane(cfg):
        return CollectivePlane(cfg, model)
    return ParameterServer(cfg, model)


def check_resumable(saved: dict, cfg: Config) -> None:
    current = to_dict(cfg)
    for key in sorted(set(saved) | set(current)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
            raise ConfigError(f"run.name={cfg.run.name} has a checkpoint made with other "
                              f"'{key}' settings ({saved.get(key)} vs {current.get(key)}); "
                              "use another run.name")


def resume(store: CheckpointStore, cfg: Config, training: TrainingStep, run_dir: Path
           ) -> Progress:
    """The progress of the newest valid checkpoint (its state loaded), or a fresh start."""
    try:
        checkpoint = store.load_latest()
    except InvalidCheckpointError as e:
        raise ConfigError(f"run.name={cfg.run.name}: {e}") from None
    if checkpoint is None:
        return Progress()
    state = checkpoint.state
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"run.name={cfg.run.name}: its checkpoint of step "
                          f"{checkpoint.step} was written by an older squall "
                          "whose layout this version does not read; use another run.name")
    check_resumable(checkpoint.manifest["config"], cfg)
    training.load_state_dict(state["strategy"])
    restore_rng_state(state["rng"])
    if checkpoint.step < cfg.steps:
        print(f"squall: resuming run {run_dir} from step {checkpoint.step} (checkpoint in "
              f"{store.uri})", file=sys.stderr)
    return Progress(**state["progress"])


def finished_summary(cfg: Config, run_dir: Path, progress: Progress) -> dict | None:
    """The summary of a run that already reached cfg.steps (nothing to do: Ray is not
    started), None when there are steps left. Asking for fewer steps than it made is an
    error."""
    if progress.step > cfg.steps:
        raise ConfigError(f"steps={cfg.steps}: run {run_dir} already went to step "
                          f"{progress.step}; give steps >= {progress.step} to continue it")
    summary_path = run_dir / "summary.json"
    if progress.step < cfg.steps or not summary_path.exists():
        return None  # (killed after its last checkpoint: the loop runs no step, writes it)
    print(f"squall: run {run_dir} already finished at step {progress.step}")
    return {**json.loads(summary_path.read_text()), "interrupted": False, "signal": "",
            "error": ""}


def save_checkpoint(store: CheckpointStore, cfg: Config, progress: Progress,
                    training: TrainingStep, workers: WorkerPool | None, t_start: float) -> None:
    """One checkpoint of the run now, unless the step has nothing to save (no live replica)."""
    strategy = training.state_dict(workers)
    if strategy is None:
        return
    snapshot = asdict(progress)
    snapshot["wall_s"] += time.perf_counter() - t_start
    store.save(progress.step, {"format": CHECKPOINT_FORMAT, "progress": snapshot,
                               "rng": capture_rng_state(), "strategy": strategy},
               {"config": to_dict(cfg)})


def start_workers(cfg: Config, pool: Pool, workload: Workload, info: DataInfo,
                  training: TrainingStep) -> WorkerPool:
    """The first machines and a worker on each; the driver's threads leave their cores."""
    machines = pool.start(cfg.workers)
    if pool.workers_here:  # the driver's idle torch threads would spin on workers' cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - math.ceil(
            cfg.workers * cfg.worker.num_cpus)))
    workers = WorkerPool(cfg, workload, info, pool, training)
    workers.start(machines)
    return workers


def due(every: int, step: int, last: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return bool(every and step % every == 0) or step == last


def next_due(every: int, step: int) -> float:
    """The first step >= `step` that is a multiple of `every` (0: never)."""
    return -(-step // every) * every if every else math.inf


def call_end(cfg: Config, training: TrainingStep, workers: WorkerPool, step: int) -> int:
    """The last step of the call that starts at `step`: at most steps_per_call steps (2
    while a replacement starts, so that it joins within 2 steps of being ready), ending at
    the next evaluation or checkpoint step, before the step a replacement takes part from,
    and at the last step."""
    most = min(training.steps_per_call, 2) if workers.joining() else training.steps_per_call
    joins = [due - 1 for due in workers.due_steps() if due > step]  # a replacement's step
    return int(min(step + most - 1, cfg.steps, next_due(cfg.eval.every, step),
                   next_due(cfg.checkpoint.every_steps, step), *joins))


class Pace:
    """The running mean of step time; a call in which nobody answered still takes one."""

    def __init__(self) -> None:
        self.typical_s = 0.05

    def after(self, outcomes: list[StepOutcome], t0: float) -> float:
        """The wall time per step of the call that began at t0 (perf_counter)."""
        step_s = (time.perf_counter() - t0) / len(outcomes)
        if outcomes[-1].answered:
            self.typical_s = 0.9 * self.typical_s + 0.1 * step_s
        else:  # nobody answered: no update, and the step's time still passes
            time.sleep(self.typical_s)
        return step_s


class EventClock:
    """The pool's events step by step. A call of several steps needs them ahead: the steps
    it may run are polled before it starts, and the first step with an event ends it (that
    step's events are held for it)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.held: dict[int, PollResult] = {}
        self.polled = 0  # the last step polled

    def at(self, step: int) -> PollResult:
        """The events of `step` (polled now unless polled ahead)."""
        if step in self.held:
            return self.held.pop(step)
        if step <= self.polled:  # polled ahead without events (a call rerun after a loss)
            return PollResult()
        self.polled = step
        return self.pool.poll(step)

    def quiet_until(self, first: int, last: int) -> int:
        """The last step in first..last before the next event (first: its events are in)."""
        for step in range(first + 1, last + 1):
            if step in self.held:
                return step - 1
            if step > self.polled:
                self.polled = step
                events = self.pool.poll(step)
                if events.joined or events.noticed or events.reclaim_now:
                    self.held[step] = events
                    return step - 1
        return last


def train(cfg: Config, given: dict[str, Any] | None = None) -> dict:
    """Run (or resume) one training job and return its summary (also in summary.json).
    `given`: callables of the workload handed over directly (orchestrator.api). A run that
    fails on a user mistake (ConfigError) leaves no new run directory behind."""
    run_dir = make_run_dir(cfg)
    created = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
    try:
        return run_training(cfg, run_dir, given or {})
    except ConfigError:
        if created is not None:  # the first folder of the path that this run made
            shutil.rmtree(created, ignore_errors=True)
        raise


def run_training(cfg: Config, run_dir: Path, given: dict[str, Any]) -> dict:
    """The run, top to bottom."""
    t_start = time.perf_counter()

    # ---- workload, model and the strategy's step: checked before Ray starts (the workers
    # load their own shards of the training split)
    workload = resolve_workload(cfg, **given)
    test_set, info = driver_data(cfg, workload)
    torch.manual_seed(cfg.seed)
    model = workload.model(info)
    check_workload(cfg, workload, model, test_set, info)
    training = make_step(cfg, model)

    # ---- resume from the newest valid checkpoint of this run, if there is one
    store = CheckpointStore(cfg.checkpoint.dir or str(run_dir / "checkpoints"),
                            keep=cfg.checkpoint.keep, part_mb=cfg.checkpoint.part_mb)
    progress = resume(store, cfg, training, run_dir)
    if (done := finished_summary(cfg, run_dir, progress)) is not None:
        return done
    pool = make_pool(cfg.cloud, job_spec(cfg))  # its own checks before the run dir
    clock = EventClock(pool)
    log = RunLog(cfg, run_dir)
    progress.lost_steps = log.open_metrics(progress.step)  # in all resumes so far

    def checkpoint() -> None:
        save_checkpoint(store, cfg, progress, training, workers, t_start)

    def record_step(step: int, outcome: StepOutcome, step_s: float, ended: float) -> dict:
        """Count the step and return its line of metrics.jsonl."""
        progress.count(step, outcome)
        return step_record(step, outcome, progress, pool, cost0, (step_s, ended), t_start)

    # ---- the machines, the workers on them, and the steps
    interrupted, stop_signal, ray_address, error = False, "", "", ""
    cost0 = (progress.cost_usd, progress.on_demand_cost_usd)
    driver_threads = torch.get_num_threads()
    workers: WorkerPool | None = None
    last_eval: dict[str, float] = {}  # the metrics of the last evaluation
    _received.clear()
    handlers = handle_stop_signals(_raise_stopped)  # they stop the run like Ctrl-C
    pace = Pace()
    try:
        workers = start_workers(cfg, pool, workload, info, training)
        handle_stop_signals(_raise_stopped)  # again, in case Ray installed its own
        ray_address = ray.get_runtime_context().gcs_address
        last_save = time.monotonic()
        step = progress.step + 1
        while step <= cfg.steps:
            progress.joins += workers.wait_for_due(step)  # replacements due: the clock waits
            t0 = time.perf_counter()
            events = clock.at(step)  # machines that joined, got a notice, or go this step
            take_events(events, step, workers, training, progress, checkpoint)

            last = clock.quiet_until(step, call_end(cfg, training, workers, step))
            outcomes = training.run(range(step, last + 1), workers, events.reclaim_now)

            step_s = pace.after(outcomes, t0)
            for i, outcome in enumerate(outcomes):  # a call's steps share its time evenly
                done = step + i
                record = record_step(done, outcome, step_s, t0 + (i + 1) * step_s)
                evaluated = {}
                if due(cfg.eval.every, done, cfg.steps):
                    evaluated = evaluate(cfg, workload, training.eval_model(workers), test_set,
                                         workers)
                    record.update(evaluated)
                    last_eval.update(evaluated)
                log.step(record, evaluated)
            ckpt = cfg.checkpoint
            if due(ckpt.every_steps, done, cfg.steps) or (
                    ckpt.every_s and time.monotonic() - last_save >= ckpt.every_s):
                checkpoint()
                last_save = time.monotonic()
            step = done + 1
    except KeyboardInterrupt:
        handle_stop_signals(signal.SIG_IGN)  # a second signal must not cut the clean-up
        interrupted = True
        stop_signal = signal.Signals(_received[-1]).name if _received else "SIGINT"
        for step, outcome in training.settle(workers):  # steps the workers were running
            log.step(record_step(step, outcome, pace.typical_s, time.perf_counter()), {})
        checkpoint()
    except (TooFewWorkers, CheckpointError) as e:  # the summary and model are still written
        error = str(e)
    finally:
        handle_stop_signals(signal.SIG_IGN)  # the machines are given back whatever comes
        torch.set_num_threads(driver_threads)
        give_back(training, workers, pool, progress, cost0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    # ---- summary and the trained model
    final = training.eval_model(None)
    torch.save(final.state_dict(), log.dir / "model.pt")
    if cfg.eval.on == "driver":  # else the workers' last evaluation
        last_eval = workload.evaluate(final, test_set, cfg.eval.batch_size)
    summary = {"run_dir": str(log.dir), "ray_address": ray_address, **last_eval,
               **summary_counts(progress, t_start), **training.summary(),
               **(workers.join_summary() if workers is not None else {}),
               "interrupted": interrupted, "signal": stop_signal, "error": error}
    log.finish(summary, progress.live, last_eval)
    return summary


def take_events(events: PollResult, step: int, workers: WorkerPool, training: TrainingStep,
                progress: Progress, checkpoint: Any) -> None:
    """Machines that joined get workers, ready workers join, noticed ones leave (after a
    checkpoint where they hold state of their own)."""
    for machine in events.joined:
        workers.add(machine)
    progress.joins += workers.admit(step)
    if events.noticed and training.checkpoint_before_drain:
        checkpoint()  # what the noticed workers hold goes with their machines
    progress.preemptions += workers.drain(events.noticed)


def give_back(training: TrainingStep, workers: WorkerPool | None, pool: Pool,
              progress: Progress, cost0: tuple) -> None:
    """The workers' last words and their end, the costs so far, the machines back."""
    if workers is not None:
        training.finish(workers)
        workers.stop()
    spot, on_demand = pool.costs()
    progress.cost_usd, progress.on_demand_cost_usd = cost0[0] + spot, cost0[1] + on_demand
    pool.shutdown()


def step_record(step: int, outcome: StepOutcome, progress: Progress, pool: Pool, cost0: tuple,
                timing: tuple[float, float], t_start: float) -> dict:
    """The step's line of metrics.jsonl (test_acc is added on eval steps); timing: its
    wall time and when it ended (perf_counter; in a call of several steps, the call's time
    split evenly)."""
    spot, on_demand = pool.costs()  # so far, for plots over time
    step_s, now = timing
    return {"step": step, "loss": progress.loss, "live_workers": outcome.answered,
            "step_s": step_s, "bytes_sent": progress.bytes_sent, "bytes_up": progress.bytes_up,
            "bytes_down": progress.bytes_down, "bytes_measure": progress.bytes_measure,
            "wall_s": progress.wall_s + now - t_start, "cost_usd": cost0[0] + spot,
            "on_demand_cost_usd": cost0[1] + on_demand, **outcome.metrics}


def summary_counts(progress: Progress, t_start: float) -> dict:
    """The summary fields every strategy family has."""
    live = progress.live
    return {"loss": progress.loss, "steps_done": progress.step,
            "wall_s": progress.wall_s + time.perf_counter() - t_start,
            "live_workers_mean": float(np.mean(live)) if live else 0.0,
            "bytes_sent": progress.bytes_sent, "bytes_up": progress.bytes_up,
            "bytes_down": progress.bytes_down, "bytes_measure": progress.bytes_measure,
            "bytes_per_worker_step": progress.bytes_sent / max(1, sum(live)),
            "cost_usd": progress.cost_usd, "on_demand_cost_usd": progress.on_demand_cost_usd,
            "preemptions": progress.preemptions, "joins": progress.joins,
            "lost_steps": progress.lost_steps, "skipped_steps": progress.skipped_steps}
