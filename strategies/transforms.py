"""The shape every robust rule and pre-aggregation step has: a pair of pure functions.

Like optax's gradient transformations: `init()` returns the state, `update(G, f, state,
generator)` returns (output, new state); nothing is kept behind the caller's back, so the
state is what a checkpoint saves (centered clipping's previous aggregate, for instance).
`chain` composes pre-aggregation steps with a rule into one transform whose state is the
tuple of theirs. G is an (n, d) tensor of worker gradients, at most f of them Byzantine;
`rows(n)` is how many rows a transform hands on (bucketing: ceil(n / s)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

State = Any
Update = Callable[[Tensor, int, State, "torch.Generator | None"], tuple[Tensor, State]]


def _same_rows(n: int) -> int:
    return n


@dataclass(frozen=True)
class Transform:
    init: Callable[[], State]
    update: Update
    rows: Callable[[int], int] = _same_rows


def stateless(fn: Callable[[Tensor, int], Tensor]) -> Transform:
    """A transform from fn(G, f) -> output, with no state (None)."""

    def update(G: Tensor, f: int, state: State, generator: torch.Generator | None = None
               ) -> tuple[Tensor, State]:
        return fn(G, f), state

    return Transform(lambda: None, update)


def chain(*transforms: Transform) -> Transform:
    """Apply the transforms in order (pre-aggregation steps, then the rule)."""

    def init() -> tuple:
        return tuple(t.init() for t in transforms)

    def update(G: Tensor, f: int, state: tuple, generator: torch.Generator | None = None
               ) -> tuple[Tensor, tuple]:
        new = []
        for t, s in zip(transforms, state):
            G, s = t.update(G, f, s, generator)
            new.append(s)
        return G, tuple(new)

    def rows(n: int) -> int:
        for t in transforms:
            n = t.rows(n)
        return n

    return Transform(init, update, rows)
