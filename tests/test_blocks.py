"""Rules and attacks by blocks of coordinates (strategies/blocks.py), in one process: k
threads each run the rule on their block, their partial sums meet at a barrier, and the
blocks put together must be the rule on the whole rows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from strategies import blocks
from strategies.attacks import bulyan_coord
from strategies.preaggregation import nnm
from strategies.rules import build_rule
from strategies.rules.centered_clip import centered_clip


class BarrierSum:
    """What an all-reduce gives k threads: the sum of their parts, the same on each."""

    def __init__(self, k: int) -> None:
        self.parts: list[Tensor | None] = [None] * k
        self.barrier = threading.Barrier(k)
        self.calls = [0] * k

    def for_thread(self, i: int) -> Callable[[Tensor], Tensor]:
        def total(partial: Tensor) -> Tensor:
            self.calls[i] += 1
            self.parts[i] = partial
            self.barrier.wait()
            out = sum(self.parts[1:], self.parts[0].clone())  # the same order everywhere
            self.barrier.wait()  # nobody overwrites a part before every thread has read it
            return out

        return total


def by_blocks(fn: Callable[[Tensor], Tensor], G: Tensor, k: int) -> tuple[Tensor, list[int]]:
    """fn on k column blocks of G, in k threads; the blocks' outputs side by side, and how
    many sums each thread took."""
    d = G.shape[1]
    width = -(-d // k)
    reducer = BarrierSum(k)
    outs: list[Tensor | None] = [None] * k
    errors: list[BaseException] = []

    def run(i: int) -> None:
        lo = i * width
        try:
            with blocks.on_block(blocks.Block(lo, d, reducer.for_thread(i))):
                outs[i] = fn(G[:, lo:lo + width].contiguous())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return torch.cat(outs, dim=-1), reducer.calls


def gradients(n: int = 11, d: int = 1001, offset: float = 0.0, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=gen) + offset
    G[-2:] += 3.0 * torch.randn(2, d, generator=gen)  # two outliers for the rules to drop
    return G


def rule(name: str, f: int = 2) -> Callable[[Tensor], Tensor]:
    transform = build_rule(name)
    return lambda G: transform.update(G, f, transform.init())[0]


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan", "geomed"])
@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: the Gram matrix is recentred
def test_a_distance_rule_by_blocks_is_the_rule_on_whole_rows(name, offset):
    G = gradients(offset=offset)
    whole = rule(name)(G)
    out, calls = by_blocks(rule(name), G, 3)
    assert len(set(calls)) == 1 and calls[0] >= 1  # every block took the same sums
    if name in ("krum", "bulyan"):  # a selection, then coordinate-wise work: the same bits
        assert torch.equal(out, whole)
    else:  # combination weights from a Gram matrix summed in another order
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)


def test_centered_clip_by_blocks_with_the_previous_aggregate_by_blocks():
    G, prev = gradients(), torch.randn(1001, generator=torch.Generator().manual_seed(9))

    def on_block(B: Tensor) -> Tensor:
        mine = prev[blocks.start():blocks.start() + B.shape[1]]  # the state's block
        return centered_clip(B, 2, mine, tau=0.5, iters=3)

    out, _ = by_blocks(on_block, G, 3)
    torch.testing.assert_close(out, centered_clip(G, 2, prev, tau=0.5, iters=3),
                               rtol=1e-5, atol=1e-6)


def test_nnm_by_blocks_is_nnm_on_whole_rows():
    G = gradients()
    out, _ = by_blocks(lambda B: nnm(B, 2), G, 4)
    torch.testing.assert_close(out, nnm(G, 2), rtol=1e-6, atol=1e-6)


def test_bulyan_coord_by_blocks_shifts_the_one_coordinate_by_the_whole_rows_statistic():
    H = gradients(n=8, d=999)
    coord = 700  # in the third of three blocks
    whole = bulyan_coord(H, 2, 10, coord=coord, scale=0.5)
    out, calls = by_blocks(lambda B: bulyan_coord(B, 2, 10, coord=coord, scale=0.5), H, 3)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-6)  # means of other widths
    moved = ((out[0] - H.mean(0)).abs() > 1e-3).nonzero().flatten().tolist()
    assert moved == [coord]


def test_outside_a_block_the_sum_is_the_identity():
    x = torch.arange(3.0)
    assert blocks.total(x) is x and blocks.current() is None and blocks.start() == 0
