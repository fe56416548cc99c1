"""Data sets, partitions across workers, and stateless batch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.data import batch_indices, load_dataset, partition


@pytest.fixture(scope="module")
def digits():
    return load_dataset(load_config().data, seed=0)


def test_digits_is_offline_and_split_by_seed(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert abs(len(digits.y_test) / 1797 - 0.2) < 0.01
    again = load_dataset(load_config().data, seed=0)
    other = load_dataset(load_config().data, seed=1)
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
    data = load_dataset(load_config(["data=fake", "data.samples=64",
                                     "data.shape=[3,16,16]"]).data, 0)
    assert data.x_train.shape == (64, 3, 16, 16) and data.x_train.dtype == np.float32
    assert set(np.unique(data.y_train)) <= set(range(10))


def test_missing_torchvision_data_is_a_config_error(tmp_path):
    cfg = load_config(["data=mnist", f"data.root={tmp_path}"]).data
    with pytest.raises(ConfigError, match="data=mnist: not found under data.root="):
        load_dataset(cfg, 0)


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
    data = load_dataset(load_config(["data=mnist", f"data.root={tmp_path}"]).data, 0)
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (8, 1, 28, 28)
    assert data.num_classes == 10 and abs(float(data.x_train.mean())) < 1.5
