"""A workload that is not classification: a character-level language model with its own
loss and its own evaluation metric, on the text beside this file (public-domain speeches).

    cd examples/char_lm
    squall train model.target=char_lm:make_model data.target=char_lm:make_data \
        loss.target=char_lm:next_char_loss eval.target=char_lm:bits_per_char \
        workers=2 steps=300 optim.name=AdamW optim.lr=3e-3 optim.momentum=0

Each sample is a window of `context` characters and the same window shifted by one (the
characters to predict). squall logs test_loss (the mean of next_char_loss over the test
windows) and bits_per_char from the eval target.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

TEXT = Path(__file__).with_name("text.txt")


class CharWindows(Dataset):
    """(window, next characters) pairs of ids over the text; `classes` is the vocabulary, so
    squall hands its size to a model factory that takes num_classes."""

    def __init__(self, ids: torch.Tensor, context: int, vocabulary: list[str]) -> None:
        self.ids, self.context, self.classes = ids, context, vocabulary

    def __len__(self) -> int:
        return len(self.ids) - self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i:i + self.context], self.ids[i + 1:i + self.context + 1]


def make_data(split: str, context: int = 32, test_fraction: float = 0.1) -> CharWindows:
    """The first 90% of the text to train on, the rest to test on."""
    text = TEXT.read_text()
    vocabulary = sorted(set(text))
    ids = torch.tensor([vocabulary.index(c) for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - test_fraction))
    return CharWindows(ids[:cut] if split == "train" else ids[cut:], context, vocabulary)


class CharModel(nn.Module):
    def __init__(self, vocabulary: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)  # (batch, context, vocabulary) logits


def make_model(num_classes: int, dim: int = 64) -> nn.Module:
    return CharModel(num_classes, dim)


def next_char_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross entropy of every next character in the batch's windows."""
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def bits_per_char(model: nn.Module, dataset: CharWindows) -> dict[str, float]:
    """The test text's bits per character (on non-overlapping windows)."""
    starts = range(0, len(dataset), dataset.context)
    inputs = torch.stack([dataset[i][0] for i in starts])
    targets = torch.stack([dataset[i][1] for i in starts])
    nats = next_char_loss(model, (inputs, targets)).item()
    return {"bits_per_char": nats / math.log(2)}
