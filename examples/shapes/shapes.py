"""Your own image classifier on your own data: a model factory and a data factory.

The data set is drawn here (no download): 16x16 grayscale images of five shapes at random
places and sizes, with noise. Train it on 4 workers with a Byzantine-robust rule:

    cd examples/shapes
    squall train model.target=shapes:make_model data.target=shapes:make_data \
        workers=4 steps=300 strategy=median

squall calls make_data("train") in each worker's process (each keeps its shard) and
make_data("test") on the driver for evaluation; make_model(**model.args) builds the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

SHAPES = ["circle", "square", "triangle", "cross", "ring"]


class Shapes(Dataset):
    """(image, label) pairs; `targets` and `classes` as torchvision's data sets have them,
    so that squall's non-iid partitions can split by class."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W)
        self.targets = torch.from_numpy(labels)
        self.classes = SHAPES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]


def draw(shape: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of `shape` at a random centre and radius."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = rng.uniform(size * 0.2, size * 0.4)
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    name = SHAPES[shape]
    if name == "circle":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif name == "square":
        mask = (abs(dy) <= r * 0.8) & (abs(dx) <= r * 0.8)
    elif name == "triangle":
        mask = (dy <= r * 0.7) & (abs(dx) <= (dy + r) * 0.6)
    elif name == "cross":
        mask = ((abs(dy) <= r * 0.25) | (abs(dx) <= r * 0.25)) & (abs(dy) <= r) & (abs(dx) <= r)
    else:  # ring
        mask = abs(np.sqrt(dy ** 2 + dx ** 2) - r * 0.8) <= r * 0.25
    return mask.astype(np.float32) + rng.normal(0, 0.3, (size, size)).astype(np.float32)


def make_data(split: str, samples: int = 2000, size: int = 16, seed: int = 0) -> Shapes:
    """`samples` training images, a quarter as many test images; the same every call."""
    count = samples if split == "train" else samples // 4
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, len(SHAPES), count)
    images = np.stack([draw(int(c), size, rng) for c in labels])
    return Shapes(images, labels.astype(np.int64))


def make_model(num_classes: int, width: int = 16) -> nn.Module:
    """A small CNN; squall passes num_classes (len(dataset.classes)) since it is asked for."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * width, num_classes))
