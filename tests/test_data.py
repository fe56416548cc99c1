"""Data sets, partitions across workers, and stateless batch sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.data import (
    StepBatches,
    batch_indices,
    fake,
    mnist,
    partition,
    shard_of,
)
from orchestrator.data import (
    digits as digits_data,
)
from orchestrator.workload import data_info


class Digits:
    """The built-in digits as arrays, for the partition tests."""

    def __init__(self, **args) -> None:
        train, test = digits_data("train", **args), digits_data("test", **args)
        self.y_train, self.y_test = train.targets.numpy(), test.targets.numpy()
        self.x_test = test.tensors[0].numpy()
        self.info = data_info(test)


@pytest.fixture(scope="module")
def digits():
    return Digits()


def test_digits_is_offline_and_split_by_its_seed(digits):
    assert digits.info.input_shape == (1, 8, 8) and digits.info.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert abs(len(digits.y_test) / 1797 - 0.2) < 0.01
    again, other = Digits(), Digits(split_seed=1)
    assert np.array_equal(digits.y_test, again.y_test)
    assert not np.array_equal(digits.x_test, other.x_test)


def test_iid_partition_is_disjoint_and_complete(digits):
    shards = partition(digits.y_train, 5, load_config().data, 0, 10)
    joined = np.concatenate(shards)
    assert len(joined) == len(digits.y_train) == len(np.unique(joined))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("workers, k", [(4, 2), (8, 2), (3, 1), (10, 3)])
def test_classes_per_worker(digits, workers, k):
    cfg = load_config(["data.partition=classes_per_worker", f"data.classes_per_worker={k}"]).data
    shards = partition(digits.y_train, workers, cfg, 0, 10)
    for shard in shards:
        assert len(np.unique(digits.y_train[shard])) == k
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined))


def test_classes_per_worker_beyond_classes_is_an_error(digits):
    cfg = load_config(["data.partition=classes_per_worker", "data.classes_per_worker=11"]).data
    with pytest.raises(ConfigError, match="must be <= 10"):
        partition(digits.y_train, 4, cfg, 0, 10)


def test_dirichlet_is_skewed_and_complete(digits):
    cfg = load_config(["data.partition=dirichlet", "data.alpha=0.1"]).data
    shards = partition(digits.y_train, 6, cfg, 0, 10)
    assert all(len(s) > 0 for s in shards)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(digits.y_train)))
    # with alpha=0.1 a worker's label distribution is far from uniform
    top_share = [np.bincount(digits.y_train[s], minlength=10).max() / len(s) for s in shards]
    assert np.mean(top_share) > 0.4


def test_batch_indices_walk_epochs_of_a_permutation():
    size, batch = 10, 4
    seen = np.concatenate([batch_indices(size, batch, step, 0, 2) for step in range(1, 6)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # first epoch: each sample once
    assert sorted(seen[10:20].tolist()) == list(range(10))  # second epoch too
    assert not np.array_equal(seen[:10], seen[10:20])  # reshuffled
    assert np.array_equal(batch_indices(size, batch, 3, 0, 2), seen[8:12])  # stateless
    assert not np.array_equal(batch_indices(size, batch, 3, 0, 1), seen[8:12])  # per rank


def test_fake_data_shape():
    train, test = fake("train", samples=64, shape=[3, 16, 16]), fake("test", samples=64)
    x, y = train.tensors
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and len(test) == 8
    assert set(y.tolist()) <= set(range(10))


def test_missing_torchvision_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data=mnist: not found under data.root="):
        mnist("train", str(tmp_path))


def test_shard_batches_are_the_stateless_batches_of_each_step(digits):
    """A worker's DataLoader reads exactly batch_indices of each step, from any step on,
    and a step of gradient accumulation is that many consecutive micro-batches."""
    cfg = load_config(["workers=3"]).data
    train = digits_data("train")
    shard = shard_of(train, 1, 3, cfg, seed=0)
    assert np.array_equal(shard, partition(digits.y_train, 3, cfg, 0, 10)[1])
    x_all, y_all = train.tensors
    batches = StepBatches(train, shard, cfg, seed=0, rank=1)
    for step in (1, 2, 3, 7, 8):  # a jump from 3 to 7, as for a worker that was away
        (x, y), = batches(step)
        idx = shard[batch_indices(len(shard), cfg.batch_size, step, 0, 1)]
        assert torch.equal(x, x_all[idx]) and torch.equal(y, y_all[idx])
    micro = StepBatches(train, shard, cfg, seed=0, rank=1, accumulate=2)(3)
    for (x, _), m in zip(micro, (5, 6)):
        assert torch.equal(x, x_all[shard[batch_indices(len(shard), cfg.batch_size, m, 0, 1)]])


def test_shard_batches_through_loader_processes_match(digits):
    """Loader processes (a DataLoader) and in-memory tensors (one indexing per tensor, the
    default for a plain TensorDataset) give the same batches, labels and types."""
    cfg = load_config(["data.loader_workers=2"]).data
    train = digits_data("train")
    shard = shard_of(train, 0, 2, cfg, seed=0)
    a = StepBatches(train, shard, cfg, seed=0, rank=0, accumulate=2)
    b = StepBatches(train, shard, load_config().data, seed=0, rank=0, accumulate=2)
    assert a.tensors is None and b.tensors is not None
    for step in range(1, 6):
        for got, expected in zip(b(step), a(step)):
            assert type(got) is type(expected) and len(got) == len(expected) == 2
            for x, y in zip(got, expected):
                assert x.dtype == y.dtype and torch.equal(x, y)


def test_non_iid_partition_needs_targets():
    cfg = load_config(["data.partition=dirichlet"]).data
    unlabelled = torch.utils.data.TensorDataset(torch.zeros(10, 2), torch.zeros(10))
    with pytest.raises(ConfigError, match="no `targets` attribute"):
        shard_of(unlabelled, 0, 2, cfg, seed=0)
    assert len(shard_of(unlabelled, 0, 2, load_config().data, seed=0)) == 5  # iid: fine


def test_torchvision_loader_on_a_local_copy(tmp_path):
    """Write a tiny MNIST in its raw IDX format and load it through torchvision."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], ">i4").tobytes() + labels.tobytes())
    train, test = mnist("train", str(tmp_path)), mnist("test", str(tmp_path))
    assert train.tensors[0].shape == (20, 1, 28, 28) and test.tensors[0].shape == (8, 1, 28, 28)
    assert len(train.classes) == 10 and abs(float(train.tensors[0].mean())) < 1.5
