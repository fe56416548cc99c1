"""Rules and attacks on one block of the coordinates.

The collective plane shards a rule by blocks: process i holds coordinates [start, start +
width) of every gradient. Coordinate-wise work (medians, trimmed means, Bulyan's second
phase, combinations of rows) needs nothing more. What sums over every coordinate, a Gram
matrix or a global statistic of an attack, adds up over the blocks: each process computes
its block's partial sum and `total` (an all-reduce) returns the sum over all of them, the
same on every process, so every decision taken from it (Krum's choice, Weiszfeld's
weights) is the same everywhere.

`on_block(Block(...))` sets the block for the code it wraps; outside it the rows are whole
and `total` is the identity. Code here stays pure torch: the caller brings the reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Block:
    """This process's coordinates [start, start + width) of d, and the sum over blocks."""

    start: int
    d: int
    total: Callable[[Tensor], Tensor]  # a partial sum over this block -> the sum over all


_CURRENT: ContextVar[Block | None] = ContextVar("squall_block", default=None)


@contextmanager
def on_block(block: Block) -> Iterator[None]:
    """Within: the rows handed to rules and attacks are `block` of the coordinates."""
    token = _CURRENT.set(block)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Block | None:
    """The block being worked on, or None when the rows are whole."""
    return _CURRENT.get()


def total(partial: Tensor) -> Tensor:
    """The sum over every block of a partial sum over this block's coordinates."""
    block = _CURRENT.get()
    return partial if block is None else block.total(partial)


def whole_width(width: int) -> int:
    """The number of coordinates of a whole row, given this block's width."""
    block = _CURRENT.get()
    return width if block is None else block.d


def start() -> int:
    """The first coordinate of this block (0 when the rows are whole)."""
    block = _CURRENT.get()
    return 0 if block is None else block.start
