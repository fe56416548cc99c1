"""The training job, top to bottom: synchronous parameter-server SGD on Ray actors.

Each step the driver publishes its parameters once (ray.put), every live worker returns the
gradient of its own mini-batch, the driver aggregates the gradients that arrived and steps
its optimizer. A worker that vanishes mid-step simply does not contribute to that step.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from orchestrator.config import Config, OptimConfig
from orchestrator.data import Dataset, load_dataset, partition
from orchestrator.metrics import RunLog
from orchestrator.models import build_model, flatten, float_buffers, unflatten_into
from orchestrator.workers import WorkerPool, connect_ray


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


def train(cfg: Config) -> dict:
    """Run one training job and return its summary (also written to summary.json)."""
    t_start = time.perf_counter()

    # ---- data, model and optimizer live on the driver; all checked before Ray starts
    data = load_dataset(cfg.data, cfg.seed)
    shards = partition(data.y_train, cfg.workers, cfg.data, cfg.seed, data.num_classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    buffers = float_buffers(model)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(cfg.optim, params)
    log = RunLog(cfg)

    # ---- the cluster and the workers
    owns_ray = connect_ray(cfg)
    ray_address = ray.get_runtime_context().gcs_address
    steps_done = skipped_steps = bytes_sent = 0
    live_counts: list[int] = []
    loss = float("nan")
    interrupted = False
    try:
        pool = WorkerPool(cfg, data, shards)

        # ---- the training loop
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            state_ref = ray.put(flatten(params + buffers))  # published once, read by all
            results, _ = pool.gradients(state_ref, step)

            if results:
                grads = torch.from_numpy(np.stack([r.grad for r in results]))
                unflatten_into(grads.mean(0), [p.grad for p in params])
                optimizer.step()
                if buffers:
                    unflatten_into(np.mean([r.buffers for r in results], axis=0), buffers)
                loss = float(np.mean([r.loss for r in results]))
            else:
                skipped_steps += 1  # nobody answered: no update, time still passes

            steps_done = step
            live_counts.append(len(results))
            bytes_sent += sum(r.nbytes for r in results)
            record = {"step": step, "loss": loss, "live_workers": len(results),
                      "step_s": time.perf_counter() - t0, "bytes_sent": bytes_sent}
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.steps:
                record["test_acc"] = evaluate(model, data, cfg.eval.batch_size)
            log.step(record)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if owns_ray:
            ray.shutdown()

    # ---- summary and the trained model
    torch.save(model.state_dict(), log.dir / "model.pt")
    test_acc = evaluate(model, data, cfg.eval.batch_size)
    summary = {
        "run_dir": str(log.dir),
        "ray_address": ray_address,
        "test_acc": test_acc,
        "loss": loss,
        "steps_done": steps_done,
        "wall_s": time.perf_counter() - t_start,
        "live_workers_mean": float(np.mean(live_counts)) if live_counts else 0.0,
        "bytes_sent": bytes_sent,
        "cost_usd": 0.0,
        "preemptions": 0,
        "skipped_steps": skipped_steps,
        "interrupted": interrupted,
    }
    log.finish(summary)
    return summary
