"""Data sets as in-memory arrays, their split across workers, and stateless mini-batch sampling."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.config import ConfigError, DataConfig


@dataclass
class Dataset:
    x_train: np.ndarray  # float32 (N, C, H, W), normalized
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load cfg.name into memory; a missing local copy is a ConfigError naming data.root."""
    if cfg.name == "digits":
        return _digits(cfg.test_fraction, seed)
    if cfg.name == "fake":
        return _fake(cfg, seed)
    return _torchvision(cfg)


def _digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5).astype(np.float32).reshape(-1, 1, 8, 8) / 0.5
    x_tr, x_te, y_tr, y_te = train_test_split(x, y.astype(np.int64), test_size=test_fraction,
                                              random_state=seed, stratify=y)
    return Dataset(x_tr, y_tr, x_te, y_te, 10)


def _fake(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian images labelled by a random linear teacher, so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, cfg.samples // 8)
    x = torch.randn(cfg.samples + n_test, *cfg.shape, generator=g)
    teacher = torch.randn(x[0].numel(), cfg.num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    x, y = x.numpy(), y.numpy()
    return Dataset(x[:cfg.samples], y[:cfg.samples], x[cfg.samples:], y[cfg.samples:],
                   cfg.num_classes)


_TORCHVISION = {  # name: (class name, per-channel mean, per-channel std)
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision(cfg: DataConfig) -> Dataset:
    import torchvision

    cls_name, mean, std = _TORCHVISION[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    root = os.path.expanduser(cfg.root)
    try:
        train = cls(root, train=True, download=cfg.download)
        test = cls(root, train=False, download=cfg.download)
    except RuntimeError:
        raise ConfigError(f"data={cfg.name}: not found under data.root={cfg.root}; copy it there "
                          "or set data.download=true on a machine with internet") from None

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data, dtype=np.float32) / 255.0
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
        m = np.asarray(mean, np.float32)[None, :, None, None]
        s = np.asarray(std, np.float32)[None, :, None, None]
        return np.ascontiguousarray((x - m) / s), np.asarray(ds.targets, dtype=np.int64)

    return Dataset(*arrays(train), *arrays(test), len(train.classes))


# --------------------------------------------------------------------------- partitioning
def partition(labels: np.ndarray, workers: int, cfg: DataConfig, seed: int,
              num_classes: int) -> list[np.ndarray]:
    """Indices of the training samples each worker slot holds (every shard non-empty)."""
    if workers > len(labels):
        raise ConfigError(f"workers={workers}: more workers than training samples "
                          f"({len(labels)})")
    rng = np.random.default_rng(seed)
    if cfg.partition == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), workers)]
    if cfg.partition == "classes_per_worker":
        if cfg.classes_per_worker > num_classes:
            raise ConfigError(f"data.classes_per_worker={cfg.classes_per_worker}: must be <= "
                              f"{num_classes}, the classes of data={cfg.name}")
        return _by_classes(labels, workers, cfg.classes_per_worker, num_classes, rng)
    return _dirichlet(labels, workers, cfg.alpha, num_classes, rng)


def _by_classes(labels: np.ndarray, workers: int, k: int, num_classes: int,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Worker i holds classes (i*k + j) mod C, j < k; a class is split evenly among its holders."""
    holders: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for w in range(workers):
        for j in range(k):
            holders[(w * k + j) % num_classes].append(w)
    shards: list[list[np.ndarray]] = [[] for _ in range(workers)]
    for c, ws in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for w, part in zip(ws, np.array_split(idx, len(ws)) if ws else []):
            shards[w].append(part)
    out = [np.sort(np.concatenate(s)) for s in shards]
    if any(len(s) == 0 for s in out):
        raise ConfigError("data.partition=classes_per_worker: some worker got no samples; "
                          "use fewer workers or more classes_per_worker")
    return out


def _dirichlet(labels: np.ndarray, workers: int, alpha: float, num_classes: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, worker proportions ~ Dirichlet(alpha); empty shards take a sample from the
    largest so that every worker can train."""
    shards: list[list[int]] = [[] for _ in range(workers)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(workers, alpha)))[:-1] * len(idx)).astype(int)
        for w, part in enumerate(np.split(idx, cuts)):
            shards[w].extend(part.tolist())
    for w in range(workers):
        if not shards[w]:
            donor = max(range(workers), key=lambda i: len(shards[i]))
            shards[w].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


# --------------------------------------------------------------------------- sampling
def batch_indices(shard_size: int, batch_size: int, step: int, seed: int, rank: int) -> np.ndarray:
    """Positions into a shard for the mini-batch of `step`: epochs of a seeded permutation.

    Stateless: the batch depends only on (seed, rank, step), so a replacement worker or a
    resumed run draws exactly the batches the original would have drawn.
    """
    start = (step - 1) * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(positions, shard_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, rank, int(epoch)]).permutation(shard_size)
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out
