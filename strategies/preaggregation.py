"""Pre-aggregation steps that run before any rule of `strategies.aggregators`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from strategies.aggregators import _CHUNK_BYTES, _column_chunks, _combine, _geometry


def bucketing(G: Tensor, s: int, generator: torch.Generator | None = None) -> Tensor:
    """Bucketing (Karimireddy et al. 2022): permute the n rows at random and average
    consecutive buckets of s rows (the last bucket may be smaller): ceil(n/s) rows out.

    Run the rule afterwards with the same f on n' = ceil(n/s) rows: each Byzantine worker
    spoils at most one bucket, so at most f buckets are bad (check_workers(rule, n', f)).
    The permutation comes from `generator` (on CPU or on G's device).
    """
    if s < 1:
        raise ValueError(f"bucket size must be >= 1, got {s}")
    n, d = G.shape
    device = generator.device if generator is not None else G.device
    perm = torch.randperm(n, generator=generator, device=device).to(G.device)
    full, rest = divmod(n, s)
    out = torch.empty(full + (rest > 0), d, dtype=G.dtype, device=G.device)
    # Gather by column chunks (in cache), not a (buckets x n) weight-matrix product: with BLAS
    # a NaN row would poison every bucket through 0 * NaN = NaN.
    for cols in _column_chunks(d, n, G.element_size(), _CHUNK_BYTES):
        rows = G[:, cols].index_select(0, perm)
        torch.mean(rows[: full * s].view(full, s, -1), dim=1, out=out[:full, cols])
        if rest:
            torch.mean(rows[full * s :], dim=0, out=out[full, cols])
    return out


def nnm(G: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023): replace each x_i by the mean of its
    n - f nearest neighbours, itself included (distances from `pairwise_sq_distances`)."""
    n = G.shape[0]
    if not 0 <= f < n:
        raise ValueError(f"nnm needs 0 <= f < n, got f={f}, n={n}")
    _, D, finite = _geometry(G)
    D = D.clone().fill_diagonal_(-1.0)  # itself first, even against duplicates
    neighbours = D.topk(n - f, dim=1, largest=False).indices
    weights = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    weights.scatter_(1, neighbours, 1.0 / (n - f))
    return _combine(G, weights, finite)


@dataclass(frozen=True)
class Preaggregator:
    """fn(G, f, bucket_size, generator) -> G'; rows(n, bucket_size) is the row count of G'."""

    name: str
    fn: Callable[[Tensor, int, int, torch.Generator | None], Tensor]
    rows: Callable[[int, int], int]
    description: str


PREAGGREGATORS: dict[str, Preaggregator] = {
    p.name: p
    for p in (
        Preaggregator(
            "bucketing",
            lambda G, f, s, gen: bucketing(G, s, gen),
            lambda n, s: math.ceil(n / s),
            "average random buckets of bucket_size rows; the rule keeps f",
        ),
        Preaggregator(
            "nnm",
            lambda G, f, s, gen: nnm(G, f),
            lambda n, s: n,
            "replace each row by the mean of its n-f nearest neighbours",
        ),
    )
}


def get_preaggregator(name: str) -> Preaggregator:
    try:
        return PREAGGREGATORS[name]
    except KeyError:
        valid = ", ".join(PREAGGREGATORS)
        raise KeyError(f"unknown preaggregator {name!r}; valid: {valid}") from None


def apply_preaggregation(
    names: list[str],
    G: Tensor,
    f: int,
    bucket_size: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply the named steps in order (e.g. ["nnm"] or ["bucketing"])."""
    for name in names:
        G = get_preaggregator(name).fn(G, f, bucket_size, generator)
    return G
