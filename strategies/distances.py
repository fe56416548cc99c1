"""Distances between workers' gradients, from their Gram matrix (pure torch, any device).

The distance-based rules (Krum, Multi-Krum, Bulyan's selection, the geometric median, centered
clipping, NNM) all start here. On CPU float32 the Gram matrix comes from the compiled kernel
in distances.c (`kernels.gram`); elsewhere from torch's matmul over column chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from strategies import blocks, kernels

INF = float("inf")

# Column chunks for elementwise work (sign_vote, pre-aggregation): temporaries stay in L3.
CHUNK_BYTES = 4 << 20
# Column chunk for the Gram matrix (a few MiB of rows at a time).
_GRAM_CHUNK_BYTES = 8 << 20
# Centre the Gram matrix when the rows' typical squared norm exceeds this many times their
# typical squared distance to a central row (see `geometry`).
_CENTER_RATIO = 4.0


def column_chunks(d: int, rows: int, itemsize: int, budget: int) -> Iterator[slice]:
    """Column slices of about `budget` bytes for `rows` rows."""
    step = max(256, budget // max(1, rows * itemsize))
    for s in range(0, d, step):
        yield slice(s, min(d, s + step))


def gram(G: Tensor, center: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """float64 Gram matrix of the rows of [G; extra] (minus center).

    By the compiled kernel where it applies (`kernels.gram`: CPU float32). Otherwise over
    column chunks, each centred in float32 (in cache: no full copy of G), multiplied in
    float32 and accumulated in float64. When G is a block of the coordinates
    (`strategies.blocks`), the Gram matrix of the whole rows: the blocks' partial ones
    summed.
    """
    if (K := kernels.gram(G, center, extra)) is not None:
        return blocks.total(K)
    n, d = G.shape
    e = 0 if extra is None else extra.shape[0]
    K = torch.zeros(n + e, n + e, dtype=torch.float64, device=G.device)
    for cols in column_chunks(d, n + e, G.element_size(), _GRAM_CHUNK_BYTES):
        X = G[:, cols] if center is None else G[:, cols] - center[cols]
        K[:n, :n] += (X @ X.T).double()
        if extra is not None:
            Y = extra[:, cols] if center is None else extra[:, cols] - center[cols]
            cross = (X @ Y.T).double()
            K[:n, n:] += cross
            K[n:, :n] += cross.T
            K[n:, n:] += (Y @ Y.T).double()
    return blocks.total((K + K.T) * 0.5)  # BLAS need not return an exactly symmetric product


def dists_from_gram(K: Tensor) -> Tensor:
    """||x_i||^2 + ||x_j||^2 - 2<x_i, x_j>, clamped at 0, diagonal 0, NaN -> +inf."""
    sq = K.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * K).clamp_min_(0.0)
    D = torch.nan_to_num(D, nan=INF, posinf=INF)
    return D.fill_diagonal_(0.0)


def _central_row(D: Tensor) -> Tensor:
    """Index (0-d tensor) of the row with the smallest summed distance to its ~n/2 closest."""
    n = D.shape[0]
    k = max(1, (n - 1) // 2)
    return D.clone().fill_diagonal_(INF).topk(k, dim=1, largest=False).values.sum(1).argmin()


def geometry(G: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(K, D, finite): Gram matrix of [G; extra], distances between G's rows, finite rows.

    Precision: a float32 Gram matrix loses the distances to cancellation when the rows share
    a common component much larger than their spread (||x_i||^2 >> ||x_i - x_j||^2).
    Measured at d = 1e6, n = 16, relative to the largest distance: 2e-5 for zero-mean rows,
    8e-4 with a common offset 10x the spread, 8e-2 at 100x, enough to reorder Krum scores.
    A float64 Gram would be exact but costs 7x more on CPU (n = 32, d = 1e6: 177 ms vs 25 ms),
    more than ByzFL's cdist. Distances are translation invariant, so when the typical row is
    more than _CENTER_RATIO times farther from 0 than from a central row (picked from the
    first, raw Gram matrix: even an imprecise Krum-like score lands in the bulk), the Gram
    matrix is recomputed centred on that row: the error is then ~2e-5 of the spread for any
    offset and Krum picks what a float64 reference picks. Otherwise the raw one is as good.

    The compiled Gram kernel centres at no cost, so with it the first Gram matrix is already
    centred on row 0: one pass for offset rows too, unless row 0 lies far from the bulk (then
    the same check recentres on the central row) or is not finite (then it starts raw).
    """
    n = G.shape[0]
    # Centred on row 0 in the first pass where the kernel applies, unless G is a block: the
    # kernel may apply to some blocks and not to others (an empty one), and every block
    # must take the same passes.
    first_centred = blocks.current() is None and kernels.gram_applies(
        G, *([] if extra is None else [extra]))
    center = G[0] if first_centred else None
    K = gram(G, center, extra)
    finite = torch.isfinite(K.diagonal()[:n])
    if center is not None and not bool(finite.all()):  # row 0 may be the non-finite one
        center = None
        K = gram(G, None, extra)
        finite = torch.isfinite(K.diagonal()[:n])
    D = dists_from_gram(K[:n, :n])
    if n > 1 and bool(finite.any()):
        c = _central_row(D)
        norms = K.diagonal().nan_to_num(nan=0.0, posinf=0.0)
        spread = D[c][finite].median()
        offset = norms[:n][finite].median()
        if extra is not None and center is None:  # extra rows far from 0: centring helps
            offset = torch.maximum(offset, norms[n:].max())
        if bool(offset > _CENTER_RATIO * spread):
            K = gram(G, G[c], extra)
            D = dists_from_gram(K[:n, :n])
    return K, D, finite


def pairwise_sq_distances(G: Tensor) -> Tensor:
    """(n, n) float64 squared Euclidean distances via the (centred) Gram matrix.

    Diagonal exactly 0, clamped at 0, rows with NaN/inf get +inf distances. See `geometry`
    for why the Gram is centred first.
    """
    return geometry(G)[1]


def combine(G: Tensor, weights: Tensor, finite: Tensor) -> Tensor:
    """weights (m, n) @ G without letting non-finite rows of weight 0 poison the result.

    (BLAS computes 0 * NaN = NaN.) Rows of the output that do use a non-finite row are NaN.
    """
    weights = weights.to(G.dtype)
    if bool(finite.all()):
        return weights @ G
    safe = torch.where(finite[:, None], G, torch.zeros((), dtype=G.dtype, device=G.device))
    out = weights @ safe
    poisoned = (weights[:, ~finite] != 0).any(1)
    return out.masked_fill_(poisoned[:, None], float("nan"))
