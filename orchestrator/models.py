"""Models, and their parameters as one flat float32 vector (what travels between driver and
workers)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


# --------------------------------------------------------------------------- built-in models
# Factories in the form every model target has (orchestrator/workload.py): keyword
# arguments in, a module out; input_shape and num_classes come from the data set.
def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32,
        hidden: int = 128) -> nn.Module:
    """Two conv layers and a small classifier (digits, MNIST)."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """One hidden layer (the 784-128-10 MLP of Chen et al. on MNIST)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet20(input_shape[0], num_classes)


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18, its first layer adapted to the data's channels."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
    return model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al. 2016, CIFAR variant: 3 stages x 3 blocks, 16/32/64 channels."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------- flat vectors
def float_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers (BatchNorm running statistics); counters are left out."""
    return [b for b in model.buffers() if b.is_floating_point()]


def flatten(tensors: list[torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1) for t in tensors]).float().cpu().numpy()


def _slices(flat: torch.Tensor, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """flat cut into views shaped like tensors, in order."""
    offset = 0
    for t in tensors:
        yield flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()


def share_flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Move float32 tensors (parameters, buffers) into one contiguous vector and make each a
    view of its slice, in order: copying the whole set in or out is then one memcpy, and
    in-place updates (optimizer steps, BatchNorm statistics) land in the vector."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    for t, view in zip(tensors, _slices(flat, tensors)):
        t.data = view
    return flat


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    """A zeroed flat vector whose slices become the parameters' .grad: backward accumulates
    straight into it (zero it with .zero_(), not zero_grad(set_to_none=True))."""
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32,
                       device=params[0].device if params else None)
    for p, view in zip(params, _slices(flat, params)):
        p.grad = view
    return flat


def unflatten_into(vector: np.ndarray | torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy a flat vector into tensors (in place), in order."""
    vec = torch.as_tensor(vector)
    total = sum(t.numel() for t in tensors)
    if vec.numel() != total:
        raise ValueError(f"flat vector has {vec.numel()} values, the model {total}")
    with torch.no_grad():
        for t, view in zip(tensors, _slices(vec, tensors)):
            t.copy_(view)


def model_vector(model: nn.Module) -> np.ndarray:
    """The model's parameters and floating-point buffers as one flat float32 vector."""
    return flatten(list(model.parameters()) + float_buffers(model))
