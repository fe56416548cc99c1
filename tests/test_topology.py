"""Topologies and Metropolis-Hastings mixing matrices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from strategies.registry import TOPOLOGIES
from strategies.topology import (
    gossip_weights,
    metropolis_hastings,
    mixing_matrix,
    neighbours,
    spectral_gap,
    torus_shape,
)

KINDS = TOPOLOGIES.names()


def _check_graph(nbrs: list[set[int]], n: int) -> None:
    assert len(nbrs) == n
    for i, js in enumerate(nbrs):
        assert i not in js
        assert all(0 <= j < n for j in js)
        assert all(i in nbrs[j] for j in js), "graph must be undirected"


def _check_doubly_stochastic(w: torch.Tensor) -> None:
    n = w.shape[0]
    assert w.shape == (n, n) and w.dtype == torch.float64
    assert torch.equal(w, w.T)
    assert bool((w >= 0).all())
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(w @ ones, ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(ones @ w, ones, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_every_subset_of_live_workers_gives_a_valid_mixing_matrix(kind: str) -> None:
    for n in range(1, 10):
        for size in range(1, n + 1):
            for live in itertools.combinations(range(n), size):
                for step in range(4 if kind == "one_peer_exp" else 1):
                    w = mixing_matrix(list(reversed(live)), kind, step)
                    _check_doubly_stochastic(w)
                    assert w.shape == (size, size)


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_are_undirected_without_self_loops(kind: str) -> None:
    for n in range(0, 40):
        for step in range(3):
            _check_graph(neighbours(kind, n, step), n)


@pytest.mark.parametrize("kind", KINDS)
def test_small_cases(kind: str) -> None:
    assert neighbours(kind, 0) == []
    assert neighbours(kind, 1) == [set()]
    assert neighbours(kind, 2) == [{1}, {0}]
    torch.testing.assert_close(
        mixing_matrix([7, 3], kind), torch.full((2, 2), 0.5, dtype=torch.float64)
    )
    assert mixing_matrix([5], kind).tolist() == [[1.0]]


@pytest.mark.parametrize("kind", ["ring", "torus", "exponential", "complete"])
def test_static_topologies_are_connected(kind: str) -> None:
    for n in range(2, 20):
        assert spectral_gap(mixing_matrix(range(n), kind)) > 1e-6, n


def test_one_peer_exp_union_over_a_period_is_connected() -> None:
    for n in range(2, 20):
        period = (n - 1).bit_length()
        prod = torch.eye(n, dtype=torch.float64)
        for step in range(period):
            prod = mixing_matrix(range(n), "one_peer_exp", step) @ prod
        assert spectral_gap(prod) > 1e-6, n


def test_shapes_of_known_graphs() -> None:
    assert neighbours("ring", 5)[0] == {1, 4}
    assert neighbours("complete", 4)[2] == {0, 1, 3}
    assert neighbours("exponential", 8)[0] == {1, 2, 4, 6, 7}
    assert neighbours("exponential", 16)[3] == {2, 4, 1, 5, 15, 7, 11}
    assert torus_shape(12) == (3, 4)
    assert torus_shape(16) == (4, 4)
    assert torus_shape(7) == (1, 7)
    assert neighbours("torus", 9)[4] == {1, 3, 5, 7}
    assert neighbours("torus", 12)[0] == {1, 3, 4, 8}


def test_torus_on_a_prime_degrades_to_a_ring() -> None:
    for n in (3, 5, 7, 11, 13):
        assert neighbours("torus", n) == neighbours("ring", n)


def test_one_peer_exp_pairs_at_distance_two_to_the_k() -> None:
    for n in (4, 8, 16):
        rounds = int(math.log2(n))
        for step in range(2 * rounds):
            hop = 2 ** (step % rounds)
            nbrs = neighbours("one_peer_exp", n, step)
            for i, js in enumerate(nbrs):
                assert len(js) == 1
                (j,) = js
                assert abs(i - j) == hop


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_exp_averages_exactly_in_log2_n_rounds(n: int) -> None:
    rounds = int(math.log2(n))
    exact = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    for start in (0, 1, 5):
        prod = torch.eye(n, dtype=torch.float64)
        for step in range(start, start + rounds):
            prod = mixing_matrix(range(n), "one_peer_exp", step) @ prod
        torch.testing.assert_close(prod, exact, rtol=0, atol=1e-15)
    # One round fewer is not enough.
    prod = torch.eye(n, dtype=torch.float64)
    for step in range(rounds - 1):
        prod = mixing_matrix(range(n), "one_peer_exp", step) @ prod
    assert (prod - exact).abs().max() >= 1.0 / n


def test_one_peer_exp_idles_unpaired_workers_when_n_is_not_a_power_of_two() -> None:
    nbrs = neighbours("one_peer_exp", 6, step=2)  # hop 4: 0<->4, 1<->5, 2 and 3 idle
    assert nbrs == [{4}, {5}, set(), set(), {0}, {1}]
    w = mixing_matrix(range(6), "one_peer_exp", 2)
    assert w[2, 2] == 1.0 and w[0, 4] == 0.5


def test_ring_spectral_gaps_match_background() -> None:
    w = mixing_matrix(range(8), "ring")
    assert w[0, 1] == pytest.approx(1 / 3) and w[0, 0] == pytest.approx(1 / 3)
    assert spectral_gap(w) == pytest.approx(0.195, abs=5e-4)
    assert spectral_gap(mixing_matrix(range(32), "ring")) == pytest.approx(0.013, abs=5e-4)


def test_exponential_gap_is_close_to_two_over_one_plus_log2_n() -> None:
    ring_gaps = []
    for n in (4, 8, 16, 32, 64):
        reference = 2 / (1 + math.log2(n))
        gap = spectral_gap(mixing_matrix(range(n), "exponential"))
        # Undirected + MH weights is a bit better than the directed 1/(1+log2 n) graph.
        assert reference <= gap <= 2 * reference, (n, gap, reference)
        ring_gaps.append(spectral_gap(mixing_matrix(range(n), "ring")))
    assert ring_gaps[-1] < 0.01


def test_spectral_gap_extremes() -> None:
    assert spectral_gap(mixing_matrix(range(6), "complete")) == pytest.approx(1.0)
    assert spectral_gap(torch.eye(4, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(torch.ones(1, 1, dtype=torch.float64)) == pytest.approx(1.0)


def test_metropolis_hastings_weights() -> None:
    # Star: centre degree 3, leaves degree 1 -> edge weights 1/4.
    w = metropolis_hastings([{1, 2, 3}, {0}, {0}, {0}])
    assert w[0, 1] == pytest.approx(0.25) and w[1, 1] == pytest.approx(0.75)
    assert w[0, 0] == pytest.approx(0.25) and w[1, 2] == 0.0
    _check_doubly_stochastic(w)


def test_metropolis_hastings_rejects_bad_graphs() -> None:
    with pytest.raises(ValueError, match="undirected"):
        metropolis_hastings([{1}, set()])
    with pytest.raises(ValueError, match="self loop"):
        metropolis_hastings([{0}])
    with pytest.raises(ValueError, match="outside"):
        metropolis_hastings([{2}, set()])


def test_mixing_matrix_uses_sorted_rank_order() -> None:
    w = mixing_matrix([9, 2, 5, 7], "ring")
    # sorted ranks 2, 5, 7, 9 sit on a ring in that order: rank 2 (row 0) neighbours 5, 9.
    assert w[0, 1] > 0 and w[0, 3] > 0 and w[0, 2] == 0
    assert gossip_weights([9, 2, 5, 7], "ring", 2) == pytest.approx({2: 1 / 3, 5: 1 / 3, 9: 1 / 3})
    with pytest.raises(ValueError, match="not live"):
        gossip_weights([1, 2], "ring", 3)
    with pytest.raises(ValueError, match="duplicate"):
        mixing_matrix([1, 1, 2], "ring")
    with pytest.raises(ValueError, match="at least one"):
        mixing_matrix([], "ring")


def test_membership_change_recomputes_weights() -> None:
    before = mixing_matrix(range(8), "ring")
    after = mixing_matrix([0, 1, 2, 4, 5, 6, 7], "ring")  # rank 3 left
    assert after.shape == (7, 7) and before.shape == (8, 8)
    assert after[2, 3] > 0  # rank 2 now gossips with rank 4


def test_unknown_topology_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="unknown topology 'hypercube'; valid: ring, torus"):
        neighbours("hypercube", 4)
    with pytest.raises(KeyError, match="one_peer_exp, complete"):
        mixing_matrix([0, 1], "star")


@pytest.mark.parametrize("kind", ["ring", "torus", "exponential", "one_peer_exp", "complete"])
def test_plain_gossip_reaches_consensus(kind: str) -> None:
    n, d = 9 if kind != "one_peer_exp" else 8, 5
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean = x.mean(dim=0)
    start = (x - mean).norm()
    for step in range(300):
        x = mixing_matrix(range(n), kind, step) @ x
    torch.testing.assert_close(x.mean(dim=0), mean, rtol=0, atol=1e-12)
    assert (x - mean).norm() < 1e-9 * start
