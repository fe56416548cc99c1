"""Data: the built-in data set factories, the split of a training set across workers, and
each worker's stateless mini-batches read through a DataLoader.

A data factory is called as fn(split, **data.args) with split "train" or "test" and returns a
map-style Dataset of (input, label) pairs (orchestrator/workload.py). The built-in ones below
hold their data in memory as tensors; a `targets` attribute (the labels by index, as
torchvision's data sets have) lets the non-iid partitions split by class.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset

from orchestrator.config import ConfigError, DataConfig


class ArrayDataset(TensorDataset):
    """Inputs and labels in memory, with `targets` and `classes` like torchvision's."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        super().__init__(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                         torch.from_numpy(np.asarray(y, dtype=np.int64)))
        self.targets = self.tensors[1]
        self.classes = list(range(num_classes))


# --------------------------------------------------------------------------- built-in data
def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def digits(split: str, test_fraction: float = 0.2, split_seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (shipped with the package), normalized to
    [-1, 1]; the test split is a stratified `test_fraction` drawn with `split_seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5).astype(np.float32).reshape(-1, 1, 8, 8) / 0.5
    x_tr, x_te, y_tr, y_te = train_test_split(x, y.astype(np.int64), test_size=test_fraction,
                                              random_state=split_seed, stratify=y)
    return ArrayDataset(x_tr, y_tr, 10) if split == "train" else ArrayDataset(x_te, y_te, 10)


def fake(split: str, samples: int = 4096, shape: tuple[int, ...] = (3, 32, 32),
         num_classes: int = 10, seed: int = 0) -> ArrayDataset:
    """Gaussian images labelled by a random linear teacher, so a model can learn them;
    `samples` training images and samples // 8 test images."""
    _check_split(split)
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, samples // 8)
    x = torch.randn(samples + n_test, *shape, generator=g)
    teacher = torch.randn(x[0].numel(), num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    part = slice(None, samples) if split == "train" else slice(samples, None)
    return ArrayDataset(x[part].numpy(), y[part].numpy(), num_classes)


_TORCHVISION = {  # name: (class name, per-channel mean, per-channel std)
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision(name: str, split: str, root: str, download: bool) -> ArrayDataset:
    """A torchvision data set from `root`, normalized per channel, held as tensors."""
    import torchvision

    _check_split(split)
    cls_name, mean, std = _TORCHVISION[name]
    try:
        ds = getattr(torchvision.datasets, cls_name)(os.path.expanduser(root),
                                                      train=split == "train", download=download)
    except RuntimeError:
        raise ConfigError(f"data={name}: not found under data.root={root}; copy it there "
                          "or set data.args.download=true on a machine with internet") from None
    x = np.asarray(ds.data, dtype=np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    return ArrayDataset((x - m) / s, np.asarray(ds.targets, dtype=np.int64), len(ds.classes))


def mnist(split: str, root: str, download: bool = False) -> ArrayDataset:
    return _torchvision("mnist", split, root, download)


def fashion_mnist(split: str, root: str, download: bool = False) -> ArrayDataset:
    return _torchvision("fashion_mnist", split, root, download)


def cifar10(split: str, root: str, download: bool = False) -> ArrayDataset:
    return _torchvision("cifar10", split, root, download)


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
                              f"{num_classes}, the classes of the data set")
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


def partition_labels(dataset: Any, cfg: DataConfig) -> np.ndarray:
    """What `partition` needs of a training set: its labels by index (the `targets`
    attribute) for the non-iid partitions; for iid only its length counts."""
    if cfg.partition == "iid":
        return np.zeros(len(dataset), dtype=np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ConfigError(f"data.partition={cfg.partition}: the training set has no `targets` "
                          "attribute (its labels by index) to split by class; use "
                          "data.partition=iid")
    return np.asarray(torch.as_tensor(targets), dtype=np.int64)


def shard_of(dataset: Any, rank: int, workers: int, cfg: DataConfig, seed: int) -> np.ndarray:
    """The indices of the training samples that worker slot `rank` holds: decided by index
    from (seed, rank, workers) alone, so a replacement rebuilds the same shard."""
    labels = partition_labels(dataset, cfg)
    num_classes = len(getattr(dataset, "classes", None) or []) or int(labels.max()) + 1
    return partition(labels, workers, cfg, seed, num_classes)[rank]


class StepBatchSampler(Sampler[list[int]]):
    """The positions (into a shard) of the mini-batches of micro-steps first, first+1, ...:
    batch_indices of each, without end."""

    def __init__(self, shard_size: int, batch_size: int, seed: int, rank: int,
                 first: int) -> None:
        self.args, self.first = (shard_size, batch_size), first
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.first
        while True:
            yield batch_indices(*self.args, micro, self.seed, self.rank).tolist()
            micro += 1


class StepBatches:
    """One worker's mini-batches, step by step: its shard read through a DataLoader whose
    batches are those of batch_indices, so a resumed run or a replacement reads exactly the
    batches the uninterrupted run would have. A step is `accumulate` micro-batches."""

    def __init__(self, dataset: Any, shard: np.ndarray, cfg: DataConfig, seed: int, rank: int,
                 accumulate: int = 1, pin_memory: bool = False) -> None:
        self.shard = Subset(dataset, shard.tolist())
        self.cfg, self.seed, self.rank, self.accumulate = cfg, seed, rank, accumulate
        self.pin_memory = pin_memory
        self.next_micro, self.batches = 0, None
        # tensors in memory read as plain TensorDataset items: a batch is one indexing of
        # each tensor, what the DataLoader's collate would stack sample by sample
        self.tensors = None
        if isinstance(dataset, TensorDataset) and \
                type(dataset).__getitem__ is TensorDataset.__getitem__ and \
                not cfg.loader_workers and not pin_memory:
            positions = torch.from_numpy(np.asarray(shard, dtype=np.int64))
            self.tensors = [t[positions] for t in dataset.tensors]

    def _indexed(self, micro: int) -> list[torch.Tensor]:
        """Micro-batch `micro` of in-memory tensors, as the DataLoader would collate it."""
        idx = torch.from_numpy(batch_indices(len(self.shard), self.cfg.batch_size, micro,
                                             self.seed, self.rank))
        return [t[idx] for t in self.tensors]

    def _loader(self, first: int) -> Iterator:
        sampler = StepBatchSampler(len(self.shard), self.cfg.batch_size, self.seed, self.rank,
                                   first)
        workers = self.cfg.loader_workers
        return iter(DataLoader(self.shard, batch_sampler=sampler, num_workers=workers,
                               pin_memory=self.pin_memory, persistent_workers=False))

    def __call__(self, step: int) -> list[Any]:
        """The micro-batches of `step` (1-based), in order."""
        first = (step - 1) * self.accumulate + 1
        if self.tensors is not None:
            return [self._indexed(micro) for micro in range(first, first + self.accumulate)]
        if self.batches is None or first != self.next_micro:  # a jump: read from there
            self.batches = self._loader(first)
        self.next_micro = first + self.accumulate
        return [next(self.batches) for _ in range(self.accumulate)]
