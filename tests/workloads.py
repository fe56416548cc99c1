"""Workload parts for the tests: importable by name (`tests.workloads:...`) on the driver and
on the workers of a local Ray session, which run in the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from orchestrator.data import ArrayDataset, digits


def recording_digits(split: str, log: str) -> ArrayDataset:
    """The built-in digits; every call appends 'split pid' to the file `log`."""
    with open(log, "a") as f:
        f.write(f"{split} {os.getpid()}\n")
    return digits(split)


def calls(log: str | Path) -> list[tuple[str, int]]:
    """The (split, pid) of every recorded call."""
    lines = Path(log).read_text().split() if Path(log).exists() else []
    return [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)]


def npz_digits(split: str, root: str) -> ArrayDataset:
    """Digits from `root`/<split>.npz (arrays x and y), as a data set on shared storage."""
    arrays = np.load(Path(root) / f"{split}.npz")
    return ArrayDataset(arrays["x"], arrays["y"], 10)


def failing_data(split: str) -> None:
    raise FileNotFoundError(f"no {split} data here")


def not_a_dataset(split: str) -> int:
    return 3


def not_a_model() -> str:
    return "model"


def vector_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return model(inputs).sum(1)  # one value per sample: not a scalar


NOT_CALLABLE = 5


def bn_mlp(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """A small MLP with BatchNorm: running statistics to average besides the gradients."""
    width = int(np.prod(input_shape))
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(width, 32),
                               torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, num_classes))
