"""The training job, top to bottom: synchronous parameter-server SGD on Ray actors.

Each step the driver publishes its parameters once (ray.put), every live worker returns the
gradient of its own mini-batch, the driver aggregates the gradients that arrived and steps
its optimizer. A worker that vanishes mid-step simply does not contribute to that step; the
spot pool brings a replacement, which joins without restarting anything. Checkpoints let a
run that lost its driver resume where it left off (same run.name).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import torch

from cloud import make_pool
from orchestrator.aggregation import Aggregation, TooFewWorkers
from orchestrator.checkpoint import CheckpointStore, capture_rng_state, restore_rng_state
from orchestrator.config import Config, ConfigError, OptimConfig, to_dict
from orchestrator.data import Dataset, load_dataset, partition
from orchestrator.metrics import RunLog
from orchestrator.models import build_model, flat_grads, float_buffers, share_flat
from orchestrator.workers import WorkerPool
from strategies.bitpack import unpack_signs

# Settings that may change when a run resumes; anything else must match its checkpoint.
RESUMABLE_CHANGES = ("steps", "run", "log", "eval", "checkpoint", "ray", "worker", "cloud")


@dataclass
class Progress:
    """Everything the summary counts; saved in checkpoints so a resumed run continues it."""

    step: int = 0
    loss: float = math.nan
    bytes_sent: int = 0
    skipped_steps: int = 0
    rejected_updates: int = 0
    preemptions: int = 0
    joins: int = 0
    lost_steps: int = 0
    cost_usd: float = 0.0
    on_demand_cost_usd: float = 0.0
    wall_s: float = 0.0
    live: list[int] = field(default_factory=list)  # live workers in each step


def build_optimizer(cfg: OptimConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int) -> float:
    """Test accuracy of the driver's model."""
    model.eval()
    correct = 0
    for i in range(0, len(data.y_test), batch_size):
        x = torch.from_numpy(data.x_test[i:i + batch_size])
        y = torch.from_numpy(data.y_test[i:i + batch_size])
        correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / len(data.y_test)


def check_resumable(saved: dict, cfg: Config) -> None:
    current = to_dict(cfg)
    for key in sorted(set(saved) | set(current)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
            raise ConfigError(f"run.name={cfg.run.name} has a checkpoint made with other "
                              f"'{key}' settings ({saved.get(key)} vs {current.get(key)}); "
                              "use another run.name")


def train(cfg: Config) -> dict:
    """Run (or resume) one training job and return its summary (also in summary.json)."""
    if cfg.strategy.name == "gossip":  # the decentralized family has its own loop
        from orchestrator.gossip import train_gossip

        return train_gossip(cfg)
    t_start = time.perf_counter()

    # ---- data, model and optimizer live on the driver; all checked before Ray starts
    data = load_dataset(cfg.data, cfg.seed)
    shards = partition(data.y_train, cfg.workers, cfg.data, cfg.seed, data.num_classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    buffers = float_buffers(model)
    # Parameters+buffers and the gradients each live in one flat vector that the tensors
    # view: publishing is one ray.put of it, applying an update one copy.
    state, grad = share_flat(params + buffers), flat_grads(params)
    optimizer = build_optimizer(cfg.optim, params)
    aggregation = Aggregation(cfg)

    # ---- resume from the newest valid checkpoint of this run, if there is one
    pool = make_pool(cfg)  # its own checks (cloud=aws: ami, run.name) before the run dir
    log = RunLog(cfg)
    store = CheckpointStore(cfg.checkpoint.dir or str(log.dir / "checkpoints"),
                            keep=cfg.checkpoint.keep)
    progress = Progress()
    checkpoint = store.load_latest()
    if checkpoint is not None:
        check_resumable(checkpoint.manifest["config"], cfg)
        model.load_state_dict(checkpoint.state["model"])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        restore_rng_state(checkpoint.state["rng"])
        progress = Progress(**checkpoint.state["progress"])
        aggregation.prev = checkpoint.state["aggregation_prev"]
    progress.lost_steps += log.open_metrics(progress.step)

    def save_checkpoint() -> None:
        snapshot = asdict(progress)
        snapshot["wall_s"] += time.perf_counter() - t_start
        snapshot["rejected_updates"] = aggregation.rejected
        store.save(progress.step, {"model": model.state_dict(), "optimizer":
                                   optimizer.state_dict(), "rng": capture_rng_state(),
                                   "progress": snapshot, "aggregation_prev": aggregation.prev},
                   {"config": to_dict(cfg)})

    # ---- the machines and the workers on them
    aggregation.rejected = progress.rejected_updates
    interrupted, ray_address, error = False, "", ""
    cost0 = (progress.cost_usd, progress.on_demand_cost_usd)
    driver_threads = torch.get_num_threads()
    workers = None
    try:
        machines = pool.start(cfg.workers)
        if pool.workers_here:  # the driver's idle torch threads would spin on workers' cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - math.ceil(
                cfg.workers * cfg.worker.num_cpus)))
        workers = WorkerPool(cfg, data, shards, pool, aggregation.byzantine)
        workers.start(machines)
        ray_address = ray.get_runtime_context().gcs_address
        last_save = time.monotonic()
        typical_step_s = 0.05  # running mean of step time: how long a skipped step waits

        # ---- the training loop
        for step in range(progress.step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            events = pool.poll(step)  # machines that joined, got a notice, or go this step
            for machine in events.joined:
                workers.add(machine)
            progress.joins += workers.admit()
            progress.preemptions += workers.drain(events.noticed)

            state_ref = ray.put(state.numpy())  # published once, read by all (zero-copy)
            results, lost = workers.gradients(state_ref, step, reclaim=events.reclaim_now)
            progress.preemptions += lost

            update = None
            if results:
                grads = torch.from_numpy(np.stack([r.grad for r in results]))
                if cfg.strategy.name == "sign_vote":  # 1-bit messages back to +-1
                    grads = torch.stack([unpack_signs(g, n_params) for g in grads])
                update = aggregation(grads, [r.rank for r in results], step)
                progress.loss = float(np.mean([r.loss for r in results]))
            if update is not None:
                grad.copy_(update)
                optimizer.step()
                if buffers:
                    state[n_params:] = torch.from_numpy(np.mean([r.buffers for r in results],
                                                                axis=0))
            else:  # nobody (or too few) answered: no update, and the step's time still passes
                progress.skipped_steps += 1
                if not results:
                    time.sleep(typical_step_s)

            progress.step = step
            if results:
                typical_step_s = 0.9 * typical_step_s + 0.1 * (time.perf_counter() - t0)
            progress.live.append(len(results))
            progress.bytes_sent += sum(r.nbytes for r in results)
            spot, on_demand = pool.costs()  # so far, for plots over time
            record = {"step": step, "loss": progress.loss, "live_workers": len(results),
                      "step_s": time.perf_counter() - t0, "bytes_sent": progress.bytes_sent,
                      "wall_s": progress.wall_s + time.perf_counter() - t_start,
                      "cost_usd": cost0[0] + spot, "on_demand_cost_usd": cost0[1] + on_demand}
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.steps:
                record["test_acc"] = evaluate(model, data, cfg.eval.batch_size)
            log.step(record)

            ckpt = cfg.checkpoint
            if (ckpt.every_steps and step % ckpt.every_steps == 0) or step == cfg.steps or (
                    ckpt.every_s and time.monotonic() - last_save >= ckpt.every_s):
                save_checkpoint()
                last_save = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint()
    except TooFewWorkers as e:
        error = str(e)
    finally:
        torch.set_num_threads(driver_threads)
        if workers is not None:
            workers.stop()
        spot, on_demand = pool.costs()
        progress.cost_usd, progress.on_demand_cost_usd = cost0[0] + spot, cost0[1] + on_demand
        pool.shutdown()

    # ---- summary and the trained model
    torch.save(model.state_dict(), log.dir / "model.pt")
    live = progress.live
    summary = {
        "run_dir": str(log.dir),
        "ray_address": ray_address,
        "test_acc": evaluate(model, data, cfg.eval.batch_size),
        "loss": progress.loss,
        "steps_done": progress.step,
        "wall_s": progress.wall_s + time.perf_counter() - t_start,
        "live_workers_mean": float(np.mean(live)) if live else 0.0,
        "bytes_sent": progress.bytes_sent,
        "cost_usd": progress.cost_usd,
        "on_demand_cost_usd": progress.on_demand_cost_usd,
        "preemptions": progress.preemptions,
        "joins": progress.joins,
        "lost_steps": progress.lost_steps,
        "skipped_steps": progress.skipped_steps,
        "rejected_updates": aggregation.rejected,
        "byzantine_ranks": sorted(aggregation.byzantine),
        "interrupted": interrupted,
        "error": error,
    }
    log.finish(summary, live)
    return summary
