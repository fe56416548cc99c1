"""Byzantine-robust aggregation rules: pure torch, on whatever device G lives on.

Every rule is ``rule(G, f, **params) -> Tensor[d]`` with G an (n, d) float tensor of worker
gradients, at most f of them Byzantine. Definitions follow the papers (docs/background.md §2).

Non-finite inputs (the ``nan`` attack) are treated as far-away outliers: order statistics
read NaN as +inf, distance-based rules give non-finite rows an infinite distance, and rows
that are not selected never leak NaN into the output. ``mean`` is the non-robust baseline
and propagates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

INF = float("inf")

# Column chunks: the CPU sorting network keeps its two ping-pong buffers (about this many
# bytes each) in L3 across its ~log2(n)^2/2 passes, elementwise work keeps its temporaries
# there. Measured on the sorting network: 1 MiB 51 ms, 4 MiB 41 ms, 16 MiB 77 ms (n=16, d=1e6).
_CHUNK_BYTES = 4 << 20
# Column chunk for the Gram matrix (a few MiB of rows at a time).
_GRAM_CHUNK_BYTES = 8 << 20
# Centre the Gram matrix when the rows' typical squared norm exceeds this many times their
# typical squared distance to a central row (see `_geometry`).
_CENTER_RATIO = 4.0


def _column_chunks(d: int, rows: int, itemsize: int, budget: int) -> Iterator[slice]:
    """Column slices of about `budget` bytes for `rows` rows."""
    step = max(256, budget // max(1, rows * itemsize))
    for s in range(0, d, step):
        yield slice(s, min(d, s + step))


# --------------------------------------------------------------------------- geometry


def _gram(G: Tensor, center: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """float64 Gram matrix of the rows of [G; extra] (minus center), over column chunks.

    Each chunk is centred in float32 (in cache: no full copy of G), multiplied in float32
    and accumulated in float64.
    """
    n, d = G.shape
    e = 0 if extra is None else extra.shape[0]
    K = torch.zeros(n + e, n + e, dtype=torch.float64, device=G.device)
    for cols in _column_chunks(d, n + e, G.element_size(), _GRAM_CHUNK_BYTES):
        X = G[:, cols] if center is None else G[:, cols] - center[cols]
        K[:n, :n] += (X @ X.T).double()
        if extra is not None:
            Y = extra[:, cols] if center is None else extra[:, cols] - center[cols]
            cross = (X @ Y.T).double()
            K[:n, n:] += cross
            K[n:, :n] += cross.T
            K[n:, n:] += (Y @ Y.T).double()
    return (K + K.T) * 0.5  # BLAS need not return an exactly symmetric product


def _dists_from_gram(K: Tensor) -> Tensor:
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


def _geometry(G: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
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
    """
    n = G.shape[0]
    K = _gram(G, None, extra)
    finite = torch.isfinite(K.diagonal()[:n])
    D = _dists_from_gram(K[:n, :n])
    if n > 1 and bool(finite.any()):
        c = _central_row(D)
        norms = K.diagonal().nan_to_num(nan=0.0, posinf=0.0)
        spread = D[c][finite].median()
        offset = norms[:n][finite].median()
        if extra is not None:
            offset = torch.maximum(offset, norms[n:].max())
        if bool(offset > _CENTER_RATIO * spread):
            K = _gram(G, G[c], extra)
            D = _dists_from_gram(K[:n, :n])
    return K, D, finite


def pairwise_sq_distances(G: Tensor) -> Tensor:
    """(n, n) float64 squared Euclidean distances via the (centred) Gram matrix.

    Diagonal exactly 0, clamped at 0, rows with NaN/inf get +inf distances. See `_geometry`
    for why the Gram is centred first.
    """
    return _geometry(G)[1]


def _combine(G: Tensor, weights: Tensor, finite: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------- sorting


def _bitonic_sort(a: Tensor, b: Tensor) -> Tensor:
    """Sort each column of a (N, w) ascending, N a power of two; b is scratch, same shape.

    A bitonic network as ~log2(N)^2/2 vectorised min/max passes over contiguous views.
    Returns the buffer that holds the result (a or b). NaN must already be mapped to +inf.
    """
    N, w = a.shape
    k = 2
    while k <= N:
        j = k // 2
        while j >= 1:
            if k < N:  # blocks of size k alternate ascending / descending
                x = a.view(N // (2 * k), 2, k // (2 * j), 2, j, w)
                y = b.view(N // (2 * k), 2, k // (2 * j), 2, j, w)
                up, down, up_out, down_out = x[:, 0], x[:, 1], y[:, 0], y[:, 1]
                torch.minimum(up[:, :, 0], up[:, :, 1], out=up_out[:, :, 0])
                torch.maximum(up[:, :, 0], up[:, :, 1], out=up_out[:, :, 1])
                torch.maximum(down[:, :, 0], down[:, :, 1], out=down_out[:, :, 0])
                torch.minimum(down[:, :, 0], down[:, :, 1], out=down_out[:, :, 1])
            else:  # final merge: everything ascending
                x = a.view(N // (2 * j), 2, j, w)
                y = b.view(N // (2 * j), 2, j, w)
                torch.minimum(x[:, 0], x[:, 1], out=y[:, 0])
                torch.maximum(x[:, 0], x[:, 1], out=y[:, 1])
            a, b = b, a
            j //= 2
        k *= 2
    return a


def _nan_to_inf(x: Tensor) -> Tensor:
    return torch.nan_to_num_(x, nan=INF, posinf=INF, neginf=-INF)


def _sorted_columns(
    G: Tensor, rows: Tensor | None = None, network: bool | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (columns, Y): Y holds G[rows][:, columns] sorted along dim 0 (NaN as +inf).

    On CUDA one torch.sort. On CPU torch.sort along dim 0 is slow for small n (~300 ns per
    column for n = 16), so columns go in chunks of ~_CHUNK_BYTES through a bitonic network
    instead (6-9x faster); both give the same values. `network` forces the choice (tests).
    Each Y lives in a reused buffer: it is valid until the next item is requested.
    """
    n, d = G.shape
    m = n if rows is None else rows.numel()
    if not (G.device.type == "cpu" if network is None else network):
        sub = G.clone() if rows is None else G.index_select(0, rows)
        yield slice(0, d), torch.sort(_nan_to_inf(sub), dim=0).values
        return
    N = 1 << max(0, (m - 1).bit_length())
    step = max(256, _CHUNK_BYTES // (N * G.element_size()))
    step = max(1, min(step, d))
    buf_a = torch.empty(N * step, dtype=G.dtype, device=G.device)
    buf_b = torch.empty_like(buf_a)
    for s in range(0, d, step):
        w = min(step, d - s)
        a, b = buf_a[: N * w].view(N, w), buf_b[: N * w].view(N, w)
        if rows is None:
            a[:m].copy_(G[:, s : s + w])
        else:
            torch.index_select(G[:, s : s + w], 0, rows, out=a[:m])
        _nan_to_inf(a[:m])
        a[m:].fill_(INF)  # padding sorts last
        yield slice(s, s + w), _bitonic_sort(a, b)[:m]


def _middle(Y: Tensor, out: Tensor) -> Tensor:
    """True median of the sorted columns of Y (mean of the two middle values when even)."""
    m = Y.shape[0]
    return torch.add(Y[(m - 1) // 2], Y[m // 2], out=out).mul_(0.5)


# --------------------------------------------------------------------------- rules


def _require(name: str, G: Tensor, f: int) -> None:
    if G.dim() != 2:
        raise ValueError(f"{name} expects G of shape (n, d), got {tuple(G.shape)}")
    reason = check_workers(name, G.shape[0], f)
    if reason is not None:
        raise ValueError(reason)


def mean(G: Tensor, f: int = 0) -> Tensor:
    """Plain average (not robust, f is ignored)."""
    _require("mean", G, f)
    return G.mean(0)


def median(G: Tensor, f: int = 0) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018); n >= 2f+1.

    For even n this is the true median, the average of the two middle values (torch.median
    would return the lower one). NaN counts as +inf.
    """
    _require("median", G, f)
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, Y in _sorted_columns(G):
        _middle(Y, out[cols])
    return out


def trimmed_mean(G: Tensor, f: int) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest
    values of each coordinate and average the n - 2f others; n > 2f. NaN counts as +inf."""
    _require("trimmed_mean", G, f)
    n = G.shape[0]
    if f == 0:
        return G.mean(0)
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, Y in _sorted_columns(G):
        torch.mean(Y[f : n - f], dim=0, out=out[cols])
    return out


def _krum_scores(D: Tensor, f: int) -> Tensor:
    """Sum of squared distances to the n-f-2 closest other vectors (at least 1)."""
    n = D.shape[0]
    k = min(max(n - f - 2, 1), max(n - 1, 1))
    others = D.clone().fill_diagonal_(INF) if n > 1 else D
    return others.topk(k, dim=1, largest=False).values.sum(1)


def krum(G: Tensor, f: int) -> Tensor:
    """Krum (Blanchard et al. 2017): the vector whose n-f-2 closest other vectors are the
    closest in summed squared distance; ties go to the lowest index. n >= 2f+3.

    (ByzFL sums n-f-1 neighbours; the paper's n-f-2 is used here.)
    """
    _require("krum", G, f)
    scores = _krum_scores(pairwise_sq_distances(G), f)
    return G[scores.argmin()].clone()


def multi_krum(G: Tensor, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum: average of the m vectors with the lowest Krum scores (m = n - f by
    default, ties to the lowest index). n >= 2f+3, 1 <= m <= n - f."""
    _require("multi_krum", G, f)
    n = G.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise ValueError(f"strategy.m must be in [1, n-f] = [1, {n - f}] for multi_krum, got {m}")
    _, D, finite = _geometry(G)
    chosen = torch.argsort(_krum_scores(D, f), stable=True)[:m]
    weights = torch.zeros(1, n, dtype=torch.float64, device=G.device)
    weights[0, chosen] = 1.0 / m
    return _combine(G, weights, finite)[0]


def _bulyan_select(D: Tensor, f: int, theta: int) -> Tensor:
    """Indices picked by theta rounds of Krum on the remaining set, reusing D.

    Each round scores only the remaining vectors against each other, with the paper's
    n_r - f - 2 neighbours (n_r the remaining count, floored at 1: for f <= 1 the last round
    would otherwise score nothing). Stays on D's device: no host sync per round.
    """
    n = D.shape[0]
    alive = torch.ones(n, dtype=torch.bool, device=D.device)
    base = D.clone().fill_diagonal_(INF)
    big = torch.finfo(D.dtype).max
    picked = []
    for r in range(theta):
        k = min(max(n - r - f - 2, 1), n - 1)
        scores = base.masked_fill(~alive[None, :], INF).topk(k, dim=1, largest=False).values.sum(1)
        scores = scores.nan_to_num(nan=big, posinf=big).masked_fill(~alive, INF)
        winner = scores.argmin()
        alive[winner] = False
        picked.append(winner)
    return torch.stack(picked)


def bulyan(G: Tensor, f: int) -> Tensor:
    """Bulyan (El Mhamdi, Guerraoui, Rouault 2018) over Krum; n >= 4f+3.

    Select theta = n - 2f vectors by repeated Krum (`_bulyan_select`), then per coordinate
    average the beta = theta - 2f selected values closest to the selected set's (true)
    coordinate-wise median. Those values form a window of beta consecutive sorted values; the
    window with the smallest radius around the median is used, the lower one on ties.
    """
    _require("bulyan", G, f)
    n = G.shape[0]
    theta = n - 2 * f
    beta = theta - 2 * f
    if n == 1:
        return G[0].clone()
    chosen = _bulyan_select(pairwise_sq_distances(G), f, theta)
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, Y in _sorted_columns(G, chosen):
        out[cols] = _closest_window_mean(Y, beta)
    return out


def _closest_window_mean(Y: Tensor, beta: int) -> Tensor:
    """Per column of the sorted Y (theta, w): mean of the beta values closest to the median.

    They are the window Y[s:s+beta] with the smallest radius max(med - Y[s], Y[s+beta-1] - med)
    (lower s on ties). The radius is quasi-convex in s (the max of a non-increasing and a
    non-decreasing sequence), so the first minimiser is the number of windows whose lower
    distance exceeds the minimum radius: a count instead of a slow argmin over dim 0.
    """
    theta, w = Y.shape
    med = _middle(Y, torch.empty_like(Y[0]))
    lower = med - Y[: theta - beta + 1]
    radius = torch.maximum(lower, Y[beta - 1 :] - med).nan_to_num_(nan=INF)
    start = (lower > radius.amin(0)).sum(0)
    # gather the windows as a flat index_select (several times faster than gather on dim 0)
    rows = torch.arange(beta, device=Y.device)[:, None] * w
    flat = (start * w + rows + torch.arange(w, device=Y.device)).view(-1)
    return Y.reshape(-1).index_select(0, flat).view(beta, w).mean(0)


def _weiszfeld(K: Tensor, nu: float, tol: float, max_iter: int, tiny: float) -> tuple[Tensor, int]:
    """Smoothed Weiszfeld in weight space; returns (beta, iterations run).

    K is the Gram matrix of m points plus, as its last row/column, the origin (all relative
    to a common centre). z = sum_j beta_j x_j, so ||z - x_i||^2 = (beta - e_i)^T K (beta - e_i)
    and ||z||^2 is the same form against the origin's row.
    """
    m = K.shape[0] - 1
    Kx, k_origin, sq = K[:m, :m], K[:m, m], K.diagonal()[:m]
    beta = torch.full((m,), 1.0 / m, dtype=K.dtype, device=K.device)  # z_0 = the mean
    for it in range(1, max_iter + 1):
        Kb = Kx @ beta
        dist = (beta @ Kb - 2.0 * Kb + sq).clamp_min(0.0).sqrt()
        b = 1.0 / dist.clamp_min(nu)
        new = b / b.sum()
        step = new - beta
        step_norm = (step @ Kx @ step).clamp_min(0.0).sqrt()
        z_norm = (beta @ Kb - 2.0 * beta @ k_origin + K[m, m]).clamp_min(0.0).sqrt()
        beta = new
        if bool(step_norm <= tol * z_norm.clamp_min(tiny)):
            return beta, it
    return beta, max_iter


def _geomed_gram(G: Tensor) -> tuple[Tensor, Tensor]:
    """(K, finite): Gram of the finite rows plus the origin (last), for `_weiszfeld`."""
    origin = torch.zeros(1, G.shape[1], dtype=G.dtype, device=G.device)
    K, _, finite = _geometry(G, extra=origin)
    keep = torch.cat([finite, torch.ones(1, dtype=torch.bool, device=G.device)])
    return K[keep][:, keep], finite


def geometric_median(
    G: Tensor, f: int = 0, nu: float = 1e-6, tol: float = 1e-6, max_iter: int = 1000
) -> Tensor:
    """Geometric median (RFA) by smoothed Weiszfeld; n >= 2f+1.

    z <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(nu, ||z - x_i||), from the mean, until
    ||z_new - z|| <= tol * max(||z||, tiny) or max_iter iterations. Rows with NaN/inf are
    dropped (weight 0).

    Every iterate is an affine combination of the rows, so the distances follow from the
    Gram matrix (`_weiszfeld`): the iterations cost O(n^2) each, and G is read only for the
    Gram matrix and the final combination, whatever the number of iterations.
    """
    _require("geomed", G, f)
    n = G.shape[0]
    K, finite = _geomed_gram(G)
    if K.shape[0] == 1:  # no finite row
        return torch.full_like(G[0], float("nan"))
    beta, _ = _weiszfeld(K, nu, tol, max_iter, torch.finfo(G.dtype).tiny)
    weights = torch.zeros(1, n, dtype=torch.float64, device=G.device)
    weights[0, finite] = beta
    return _combine(G, weights, finite)[0]


def centered_clip(
    G: Tensor, f: int = 0, prev: Tensor | None = None, tau: float = 1.0, iters: int = 3
) -> Tensor:
    """Centered clipping (Karimireddy et al. 2021); n >= 2f+1.

    v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||), iters times from prev (zeros
    when None). A row with NaN/inf contributes nothing (its clipped step is undefined).

    Like `geometric_median` this runs on weights: v = p + sum_j a_j (x_j - p), so the
    distances ||x_i - v|| come from the Gram matrix of [G; p] and G is read only for the
    Gram matrix and the final combination.
    """
    _require("centered_clip", G, f)
    n, d = G.shape
    p = torch.zeros(1, d, dtype=G.dtype, device=G.device) if prev is None else prev
    p = p.reshape(1, d).to(G.dtype)
    K, _, finite = _geometry(G, extra=p)
    keep = torch.cat([finite, torch.ones(1, dtype=torch.bool, device=G.device)])
    K = K[keep][:, keep]  # the finite rows, then p
    m = K.shape[0] - 1
    a = torch.zeros(m, dtype=K.dtype, device=K.device)
    for _ in range(iters):
        w = torch.cat([a, (1.0 - a.sum()).reshape(1)])  # v as affine weights over [x; p]
        Kw = K @ w
        dist = (w @ Kw - 2.0 * Kw[:m] + K.diagonal()[:m]).clamp_min(0.0).sqrt()
        scale = (tau / dist).nan_to_num(nan=1.0, posinf=1.0).clamp_max(1.0)
        a = a + (scale - scale.sum() * a) / n  # sum_i s_i (x_i - v) in the x_j - p basis
    weights = torch.zeros(1, n, dtype=K.dtype, device=G.device)
    weights[0, finite] = a
    v = _combine(G, weights, finite)[0]
    return v if prev is None else v.add_(p[0], alpha=float(1.0 - a.sum()))


def sign_vote(G: Tensor, f: int = 0) -> Tensor:
    """signSGD majority vote: sign(sum_i sign(G_i)); ties give 0, NaN entries abstain."""
    _require("sign_vote", G, f)
    # torch.sign already maps NaN to 0 on CPU; nansum keeps the abstention explicit.
    # In column chunks: the n x chunk temporaries stay in cache (7x faster at d = 1e6).
    n, d = G.shape
    out = torch.empty(d, dtype=G.dtype, device=G.device)
    for cols in _column_chunks(d, n, G.element_size(), _CHUNK_BYTES):
        torch.sign(torch.nansum(torch.sign(G[:, cols]), dim=0), out=out[cols])
    return out


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Aggregator:
    """A rule with the smallest worker count it tolerates f Byzantine workers with."""

    name: str
    fn: Callable[..., Tensor]
    min_workers: Callable[[int], int]
    requirement: str


def _majority(f: int) -> int:
    return 2 * f + 1


AGGREGATORS: dict[str, Aggregator] = {
    a.name: a
    for a in (
        Aggregator("mean", mean, lambda f: 1, "n >= 1"),
        Aggregator("median", median, _majority, "n >= 2f+1"),
        Aggregator("trimmed_mean", trimmed_mean, _majority, "n >= 2f+1"),
        Aggregator("krum", krum, lambda f: 2 * f + 3, "n >= 2f+3"),
        Aggregator("multi_krum", multi_krum, lambda f: 2 * f + 3, "n >= 2f+3"),
        Aggregator("bulyan", bulyan, lambda f: 4 * f + 3, "n >= 4f+3"),
        Aggregator("geomed", geometric_median, _majority, "n >= 2f+1"),
        Aggregator("centered_clip", centered_clip, _majority, "n >= 2f+1"),
        Aggregator("sign_vote", sign_vote, _majority, "n >= 2f+1"),
    )
}


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]
    except KeyError:
        valid = ", ".join(AGGREGATORS)
        raise KeyError(f"unknown aggregator {name!r}; valid: {valid}") from None


def check_workers(name: str, n: int, f: int) -> str | None:
    """None when n workers let `name` tolerate f Byzantine ones, else a one-line reason."""
    agg = get_aggregator(name)
    if f < 0:
        return f"{name} needs f >= 0, got f={f}"
    need = agg.min_workers(f)
    if n < need:
        return f"{name} needs {agg.requirement} = {need} workers for f={f}, got {n}"
    return None


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "bulyan",
    "centered_clip",
    "check_workers",
    "geometric_median",
    "get_aggregator",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "pairwise_sq_distances",
    "sign_vote",
    "trimmed_mean",
]
