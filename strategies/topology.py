"""Gossip topologies and doubly stochastic mixing matrices (pure torch).

Graphs are built over *positions* 0..n-1 of the live workers (position p is the p-th
smallest live rank), so they are rebuilt whenever membership changes. Every graph is
undirected, has no self loops, and is returned as a list of neighbour sets.

Topologies:

- ``ring``: p <-> p +- 1 (mod n).
- ``torus``: an r x c grid with wrap-around, r the largest divisor of n with r <= sqrt(n)
  (as square as possible). When n is prime the only grid is 1 x n, so the torus degrades
  to a ring; with a side of length 2 the two wrap-around neighbours coincide.
- ``exponential``: static exponential graph, p <-> p +- 2^k (mod n) for every 2^k < n.
- ``one_peer_exp``: time-varying one-peer exponential graph. At step t with
  k = t mod ceil(log2 n), position p is paired with p XOR 2^k (a peer at distance exactly
  2^k) when that position exists, otherwise it sits the round out. The pairing is a
  perfect matching of the hypercube, hence symmetric: Metropolis-Hastings gives
  W_t = (I + P_t) / 2, which is symmetric and doubly stochastic (the classic directed
  variant p -> p + 2^k mod n is only column stochastic once symmetrised). For n a power
  of two the product of log2 n consecutive W_t is exactly 11^T / n. For other n, some
  positions idle in some rounds and the averaging is not exact, but the union over a
  period is connected (clearing the top bit of p reaches a smaller position).
- ``complete``: every pair.

n = 1 has no neighbours; n = 2 makes the two workers neighbours in every topology.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from strategies.registry import TOPOLOGIES

Neighbours = list[set[int]]


@TOPOLOGIES.register("ring", "p <-> p +- 1 (mod n)")
def _ring(n: int, step: int = 0) -> Neighbours:
    return [{(p - 1) % n, (p + 1) % n} - {p} for p in range(n)]


def torus_shape(n: int) -> tuple[int, int]:
    """Rows and columns (rows <= cols) of the most square grid with n cells."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0) if n > 0 else 0
    return rows, (n // rows if rows else 0)


@TOPOLOGIES.register("torus", "an r x c grid with wrap-around, as square as n allows")
def _torus(n: int, step: int = 0) -> Neighbours:
    rows, cols = torus_shape(n)
    out: Neighbours = []
    for p in range(n):
        r, c = divmod(p, cols)
        cells = {
            ((r - 1) % rows, c),
            ((r + 1) % rows, c),
            (r, (c - 1) % cols),
            (r, (c + 1) % cols),
        }
        out.append({rr * cols + cc for rr, cc in cells} - {p})
    return out


@TOPOLOGIES.register("exponential", "static exponential graph: p <-> p +- 2^k (mod n)")
def _exponential(n: int, step: int = 0) -> Neighbours:
    hops = [1 << k for k in range(max(n - 1, 0).bit_length())]  # all 2^k < n
    return [{(p + sign * h) % n for h in hops for sign in (1, -1)} - {p} for p in range(n)]


@TOPOLOGIES.register("one_peer_exp", "time-varying: one peer at distance 2^(t mod log2 n)",
                     extra={"time_varying": True})
def _one_peer_exp(n: int, step: int = 0) -> Neighbours:
    if n < 2:
        return [set() for _ in range(n)]
    rounds = (n - 1).bit_length()  # ceil(log2 n)
    hop = 1 << (step % rounds)
    return [{p ^ hop} if (p ^ hop) < n else set() for p in range(n)]


@TOPOLOGIES.register("complete", "every pair")
def _complete(n: int, step: int = 0) -> Neighbours:
    return [set(range(n)) - {p} for p in range(n)]


def neighbours(kind: str, n: int, step: int = 0) -> Neighbours:
    """Neighbour sets of positions 0..n-1 for topology ``kind`` at gossip step ``step``."""
    build = TOPOLOGIES.get(kind).build
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return build(n, step)


def metropolis_hastings(nbrs: Sequence[set[int]]) -> torch.Tensor:
    """Metropolis-Hastings weights (float64, n x n) for an undirected graph.

    w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, w_ii = 1 - sum_j w_ij, 0 elsewhere.
    """
    n = len(nbrs)
    adj = torch.zeros(n, n, dtype=torch.float64)
    for i, js in enumerate(nbrs):
        if i in js:
            raise ValueError(f"self loop at node {i}")
        if any(not 0 <= j < n for j in js):
            raise ValueError(f"node {i} has a neighbour outside 0..{n - 1}")
        adj[i, list(js)] = 1.0
    if not torch.equal(adj, adj.T):
        raise ValueError("graph must be undirected (neighbour sets must be symmetric)")
    deg = adj.sum(dim=1)
    w = adj / (1.0 + torch.maximum(deg[:, None], deg[None, :]))
    w += torch.diag(1.0 - w.sum(dim=1))
    return w


def mixing_matrix(live_ranks: Sequence[int], kind: str, step: int = 0) -> torch.Tensor:
    """Mixing matrix W over the live workers; rows/cols follow ``sorted(live_ranks)``."""
    ranks = sorted(live_ranks)
    if not ranks:
        raise ValueError("mixing_matrix needs at least one live worker")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"duplicate ranks in {list(live_ranks)}")
    return metropolis_hastings(neighbours(kind, len(ranks), step))


def gossip_weights(
    live_ranks: Sequence[int], kind: str, rank: int, step: int = 0
) -> dict[int, float]:
    """Row of W for ``rank`` as {rank: weight}, self included, zero weights dropped."""
    ranks = sorted(live_ranks)
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not live: {ranks}")
    row = mixing_matrix(ranks, kind, step)[ranks.index(rank)]
    return {r: float(w) for r, w in zip(ranks, row.tolist()) if w != 0.0}


def spectral_gap(w: torch.Tensor) -> float:
    """1 - ||W - 11^T/n||_2 (spectral norm); 1 means one step averages exactly."""
    n = w.shape[0]
    w = w.to(torch.float64)
    return 1.0 - float(torch.linalg.matrix_norm(w - 1.0 / n, ord=2))
