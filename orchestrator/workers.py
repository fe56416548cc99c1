"""Ray side: joining or starting a cluster, and the worker actors that compute gradients."""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from orchestrator.config import Config, ConfigError
from orchestrator.data import Dataset, batch_indices
from orchestrator.models import build_model, flatten, float_buffers, unflatten_into

# Parameters arrive as read-only numpy views of the object store; they are only read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def connect_ray(cfg: Config) -> bool:
    """Join ray.address / $RAY_ADDRESS, or start a local Ray sized for the workers.

    Returns True when this call connected (so the caller shuts Ray down at the end)."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1,
                                       math.ceil(cfg.workers * cfg.worker.num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=cfg.ray.dashboard,
                 logging_level=logging.WARNING)
    return True


@dataclass
class GradientResult:
    rank: int
    grad: np.ndarray  # flat float32 gradient of the mini-batch loss
    buffers: np.ndarray  # flat BatchNorm statistics after the forward pass (empty if none)
    loss: float

    @property
    def nbytes(self) -> int:
        return self.grad.nbytes + self.buffers.nbytes


class Worker:
    """One worker slot: holds its shard of the training data and a model replica."""

    def __init__(self, rank: int, x: np.ndarray, y: np.ndarray, shard: np.ndarray, cfg: Config,
                 input_shape: tuple[int, ...], num_classes: int, device: str) -> None:
        torch.set_num_threads(max(1, int(cfg.worker.num_cpus)))
        self.rank, self.cfg, self.device = rank, cfg, torch.device(device)
        self.x = torch.from_numpy(x[shard]).to(self.device)  # fancy indexing copies the shard
        self.y = torch.from_numpy(y[shard]).to(self.device)
        self.model = build_model(cfg.model, input_shape, num_classes).to(self.device)
        self.params = list(self.model.parameters())
        self.buffers = float_buffers(self.model)
        self.n_params = sum(p.numel() for p in self.params)

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gradient(self, state: np.ndarray, step: int) -> GradientResult:
        """Load the driver's parameters and buffers, return the gradient on this step's batch."""
        state_t = torch.from_numpy(state).to(self.device)
        unflatten_into(state_t[:self.n_params], self.params)
        unflatten_into(state_t[self.n_params:], self.buffers)
        idx = batch_indices(len(self.y), self.cfg.data.batch_size, step, self.cfg.seed, self.rank)
        idx_t = torch.from_numpy(idx).to(self.device)
        self.model.train()
        self.model.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(self.model(self.x[idx_t]), self.y[idx_t])
        loss.backward()
        return GradientResult(self.rank, flatten([p.grad for p in self.params]),
                              flatten(self.buffers), loss.item())


RemoteWorker = ray.remote(Worker)


def worker_device(cfg: Config) -> tuple[str, float]:
    """(device, GPUs per worker) from worker.device and the cluster's GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.worker.device == "cuda" and gpus == 0:
        raise ConfigError("worker.device=cuda: the Ray cluster has no GPU; use auto or cpu")
    if cfg.worker.device == "cpu" or gpus == 0:
        return "cpu", 0.0
    return "cuda", min(1.0, gpus / cfg.workers)


class WorkerPool:
    """The live worker actors by rank. A worker whose actor dies or times out is dropped."""

    def __init__(self, cfg: Config, data: Dataset, shards: list[np.ndarray]) -> None:
        self.timeout = cfg.worker.step_timeout_s
        device, gpus = worker_device(cfg)
        x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
        self.actors = {
            rank: RemoteWorker.options(num_cpus=cfg.worker.num_cpus, num_gpus=gpus).remote(
                rank, x_ref, y_ref, shards[rank], cfg, data.input_shape, data.num_classes, device)
            for rank in range(cfg.workers)}
        try:
            ray.get([a.ready.remote() for a in self.actors.values()],
                    timeout=cfg.worker.start_timeout_s)
        except GetTimeoutError:
            raise ConfigError(
                f"workers={cfg.workers} did not all start within worker.start_timeout_s="
                f"{cfg.worker.start_timeout_s}: each needs {cfg.worker.num_cpus} CPU(s), the "
                f"cluster has {ray.cluster_resources().get('CPU', 0):g}") from None

    def __len__(self) -> int:
        return len(self.actors)

    def gradients(self, state_ref: ray.ObjectRef, step: int) -> tuple[list[GradientResult], int]:
        """Ask every live worker for its gradient; return those that answered (sorted by rank)
        and how many workers were lost during the step."""
        pending = {self.actors[r].gradient.remote(state_ref, step): r for r in self.actors}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=self.timeout)
        results, lost = [], [pending[ref] for ref in late]
        for ref in ready:
            try:
                results.append(ray.get(ref))
            except RayActorError:
                lost.append(pending[ref])
        for rank in lost:
            ray.kill(self.actors.pop(rank), no_restart=True)
        return sorted(results, key=lambda r: r.rank), len(lost)
