"""Byzantine-robust aggregation rules: pure torch, on whatever device G lives on.

Every rule is ``rule(G, f, **params) -> Tensor[d]`` with G an (n, d) float tensor of worker
gradients, at most f of them Byzantine. Definitions follow the papers (docs/background.md §2).

Non-finite inputs (the ``nan`` attack) are treated as far-away outliers: order statistics
read NaN as +inf, distance-based rules give non-finite rows an infinite distance, and rows
that are not selected never leak NaN into the output. ``mean`` is the non-robust baseline
and propagates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
from torch import Tensor

from strategies import kernels

INF = float("inf")

# Column chunks for elementwise work (sign_vote, pre-aggregation): temporaries stay in L3.
_CHUNK_BYTES = 4 << 20
# Column chunks for the selection networks: the input chunk and two scratch buffers of about
# this many bytes each stay in L2/L3 across the network's 6-10 passes, while each torch call
# (~2 us) still covers 7k-26k columns. Measured (n = 16 and 32, d = 1e5 and 1e6): 1 and
# 2 MiB within 10% of each other, 512 KiB and 4 MiB up to 1.5x slower.
_NETWORK_CHUNK_BYTES = 1 << 20
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
    """float64 Gram matrix of the rows of [G; extra] (minus center).

    By the compiled kernel where it applies (`kernels.gram`: CPU float32). Otherwise over
    column chunks, each centred in float32 (in cache: no full copy of G), multiplied in
    float32 and accumulated in float64.
    """
    if (K := kernels.gram(G, center, extra)) is not None:
        return K
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

    The compiled Gram kernel centres at no cost, so with it the first Gram matrix is already
    centred on row 0: one pass for offset rows too, unless row 0 lies far from the bulk (then
    the same check recentres on the central row) or is not finite (then it starts raw).
    """
    n = G.shape[0]
    center = G[0] if kernels.gram_applies(G, *([] if extra is None else [extra])) else None
    K = _gram(G, center, extra)
    finite = torch.isfinite(K.diagonal()[:n])
    if center is not None and not bool(finite.all()):  # row 0 may be the non-finite one
        center = None
        K = _gram(G, None, extra)
        finite = torch.isfinite(K.diagonal()[:n])
    D = _dists_from_gram(K[:n, :n])
    if n > 1 and bool(finite.any()):
        c = _central_row(D)
        norms = K.diagonal().nan_to_num(nan=0.0, posinf=0.0)
        spread = D[c][finite].median()
        offset = norms[:n][finite].median()
        if extra is not None and center is None:  # extra rows far from 0: centring helps
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


# --------------------------------------------------------------------------- order statistics
#
# Median, trimmed mean and Bulyan need a few order statistics of each column, not a sort. On
# CPU torch.sort along dim 0 costs ~300 ns per column for small n, so they come from a
# sorting network run as vectorised torch.minimum / torch.maximum over column chunks, pruned
# to the comparators the wanted ranks depend on: only those ranks come out right. Once its
# compiled kernel is ready (`kernels`: one loop over the columns, same results to the bit), a
# rule on CPU runs that instead.


def _pairwise_network(N: int) -> list[tuple[int, int]]:
    """Parberry's pairwise sorting network on N = 2^k wires; (i, j) leaves the min on i.

    Chosen over Batcher's odd-even merge sort and bitonic sort: pruned to the ranks used here
    it needs the fewest min/max rows in the fewest torch calls (trimmed mean, n = 32, f = 7:
    294 rows in 62 calls; Batcher 298 in 80, bitonic 382).
    """
    net = []
    a = 1
    while a < N:  # sort pairs, pairs of pairs, ...
        net += [(i, i + a) for i in range(N - a) if i // a % 2 == 0]
        a *= 2
    a, e = N // 4, 1
    while a > 0:  # ... then merge them
        d = e
        while d > 0:
            net += [(b - d * a, b) for b in range((d + 1) * a, N) if b // a % 2 == 0]
            d //= 2
        a, e = a // 2, 2 * e + 1
    return net


@lru_cache(maxsize=256)
def _pruned_network(m: int, ranks: tuple[int, ...]) -> tuple[kernels.Comparators, tuple]:
    """(comparators, rows): a network on m rows that leaves rank ranks[k] on row rows[k].

    Comparators are (i, j, keep_min, keep_max): row i gets the min, row j the max, and only
    the outputs some wanted rank depends on are kept. The network is the pairwise one on
    N = 2^k wires whose last N - m carry +inf: comparators against them do nothing but move
    a value to another wire, so they are dropped and the wire is relabelled instead.
    """
    N = 1 << max(0, (m - 1).bit_length())
    row: list[int | None] = [*range(m), *[None] * (N - m)]  # row held by each wire; None: +inf
    comparators = []
    for i, j in _pairwise_network(N):
        if row[j] is None:
            continue
        if row[i] is None:
            row[i], row[j] = row[j], None
        else:
            comparators.append((row[i], row[j]))
    outs = [row[r] for r in ranks]
    live, kept = set(outs), []
    for i, j in reversed(comparators):
        if i in live or j in live:
            kept.append((i, j, i in live, j in live))
            live |= {i, j}
    return tuple(kept[::-1]), tuple(outs)


def _strided_blocks(rows: list[int]) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Cover sorted distinct rows by (first, (groups, group step, count, step)) blocks:
    first + g * group_step + c * step for g < groups, c < count. Greedy, good enough for the
    regular patterns of a sorting network."""
    runs: list[list[int]] = []  # [first, count, step]
    for r in rows:
        if runs and (runs[-1][1] == 1 or r == runs[-1][0] + runs[-1][1] * runs[-1][2]):
            run = runs[-1]
            run[2] = r - run[0] if run[1] == 1 else run[2]
            run[1] += 1
        else:
            runs.append([r, 1, 1])
    blocks: list[list[int]] = []  # [first, groups, group step, count, step]
    for first, count, step in runs:
        b = blocks[-1] if blocks else None
        if b and b[3:] == [count, step] and (b[1] == 1 or first == b[0] + b[1] * b[2]):
            b[2] = first - b[0] if b[1] == 1 else b[2]
            b[1] += 1
        else:
            blocks.append([first, 1, 1, count, step])
    return [(b[0], (b[1], b[2], b[3], b[4])) for b in blocks]


@dataclass(frozen=True)
class _Op:
    """fn(a, b, out=out) on the rows first + g * group_step + c * step of three buffers.

    Operands are (buffer, first row); buffer 0 is the input (read only), 1 and 2 scratch.
    """

    fn: Callable[..., Tensor]
    a: tuple[int, int]
    b: tuple[int, int]
    out: tuple[int, int]
    shape: tuple[int, int, int, int]  # groups, group step, count, step (in rows)


@lru_cache(maxsize=256)
def _selection_program(m: int, ranks: tuple[int, ...]) -> tuple[tuple[_Op, ...], tuple]:
    """(ops, outputs): batched ops leaving rank ranks[k] of m rows at outputs[k] = (buffer, row).

    Each comparator runs in the layer after the last one that touched its rows, and writes
    its outputs to the other scratch buffer (the one not holding the row's current value),
    so no op overwrites what another op of its layer reads. Per layer, the comparators with
    the same output side, row distance and buffers become one strided op: ~30 torch calls
    for n = 16 instead of ~100 (each costs ~2 us, a 16k-column row ~2 us of work).
    """
    comparators, outs = _pruned_network(m, ranks)
    depth = [0] * m
    layers: dict[int, list[tuple]] = {}
    for c in comparators:
        depth[c[0]] = depth[c[1]] = max(depth[c[0]], depth[c[1]]) + 1
        layers.setdefault(depth[c[0]], []).append(c)
    where = [0] * m  # buffer holding each row's current value
    ops = []
    for layer in layers.values():
        batches: dict[tuple, list[int]] = {}
        for i, j, keep_min, keep_max in layer:
            for fn, keep, row in ((torch.minimum, keep_min, i), (torch.maximum, keep_max, j)):
                if keep:
                    key = (fn, where[i], where[j], j - i, _other(where[row]), row - i)
                    batches.setdefault(key, []).append(i)
        for (fn, buf_i, buf_j, gap, dst, shift), firsts in batches.items():
            for first, shape in _strided_blocks(sorted(firsts)):
                ops.append(
                    _Op(fn, (buf_i, first), (buf_j, first + gap), (dst, first + shift), shape)
                )
        for i, j, keep_min, keep_max in layer:
            for row, keep in ((i, keep_min), (j, keep_max)):
                where[row] = _other(where[row]) if keep else where[row]
    return tuple(ops), tuple((where[r], r) for r in outs)


def _other(buf: int) -> int:
    """The scratch buffer a row's next value goes to: not the one holding its current value."""
    return 2 if buf == 1 else 1


def _rows(T: Tensor, first: int, shape: tuple[int, int, int, int]) -> Tensor:
    """The (groups, count, columns) view of rows first + g * group_step + c * step of T."""
    groups, group_step, count, step = shape
    r = T.stride(0)
    return T.as_strided(
        (groups, count, T.shape[1]),
        (group_step * r, step * r, T.stride(1)),
        T.storage_offset() + first * r,
    )


class _Selector:
    """A selection program bound to (m, w) chunks: scratch buffers and their views built once."""

    def __init__(self, m: int, ranks: tuple[int, ...], like: Tensor, w: int) -> None:
        ops, outs = _selection_program(m, ranks)
        scratch = (None, like.new_empty(m, w), like.new_empty(m, w))

        def view(operand: tuple[int, int], shape: tuple) -> Tensor | tuple:
            buf, first = operand
            return _rows(scratch[buf], first, shape) if buf else (first, shape)

        self.ops = [(op.fn, *(view(x, op.shape) for x in (op.a, op.b, op.out))) for op in ops]
        self.outs = [(scratch[buf][r] if buf else r) for buf, r in outs]

    def __call__(self, X: Tensor) -> list[Tensor]:
        """The order statistics of X's columns: views into scratch or X, valid until the next
        call. Operands in X (a tuple, not a view yet) are viewed for each X."""

        def operand(x: Tensor | tuple) -> Tensor:
            return x if isinstance(x, Tensor) else _rows(X, *x)

        for fn, a, b, out in self.ops:
            fn(operand(a), operand(b), out=out)
        return [o if isinstance(o, Tensor) else X[o] for o in self.outs]


def _nan_to_inf(x: Tensor) -> Tensor:
    return torch.nan_to_num_(x, nan=INF, posinf=INF, neginf=-INF)


def _order_statistics(
    G: Tensor, ranks: tuple[int, ...], rows: Tensor | None = None, network: bool | None = None
) -> Iterator[tuple[slice, Tensor, list[Tensor]]]:
    """Yield (columns, X, stats): X = G[rows][:, columns] with NaN read as +inf, stats[k] the
    row of rank ranks[k] of X sorted along dim 0. All valid until the next item.

    On CPU a pruned sorting network (`_selection_program`) over chunks of columns, on CUDA
    one torch.sort; both give the same values. `network` forces the choice (tests). Chunks
    all have the same width (the last one overlaps the one before), so the views are built
    once. The network reads G in place: minimum / maximum propagate NaN to every output, so
    a chunk is copied and NaN mapped to +inf only when its first output has one.
    """
    n, d = G.shape
    m = n if rows is None else rows.numel()
    if not (G.device.type == "cpu" if network is None else network):
        X = _nan_to_inf(G.clone() if rows is None else G.index_select(0, rows))
        Y = torch.sort(X, dim=0).values
        yield slice(0, d), X, [Y[r] for r in ranks]
        return
    if d == 0:
        return
    chunks = -(-d // max(256, _NETWORK_CHUNK_BYTES // (m * G.element_size())))  # ceil
    w = -(-d // chunks)  # equal widths: the last chunk overlaps by fewer than `chunks` columns
    select = _Selector(m, ranks, G, w)
    gathered = None if rows is None else G.new_empty(m, w)
    for s in [*range(0, d - w, w), d - w]:
        cols = slice(s, s + w)
        X = G[:, cols] if rows is None else torch.index_select(G[:, cols], 0, rows, out=gathered)
        stats = select(X)
        if bool(stats[0].amax().isnan()):  # amax propagates NaN (8x cheaper than isnan().any())
            X = _nan_to_inf(X if rows is not None else X.clone())
            stats = select(X)
        yield cols, X, stats


def _fused(key: tuple, body: Callable, G: Tensor, *args: Tensor) -> Tensor | None:
    """body(G, *args) by its compiled kernel (`kernels`), or None for the eager path: compiling
    is off, G is not on the CPU, the kernel is not ready yet (its compile is then queued), or
    the answer holds NaN (kernels read G as it is, the eager path reads NaN as +inf)."""
    if not kernels.enabled(G):
        return None
    n, W = G.shape[0], kernels.EXAMPLE_WIDTH

    def example() -> tuple[Tensor, ...]:  # the same shapes but the width, which is dynamic
        return (torch.zeros(n, W, dtype=G.dtype), *args)  # (no draw from torch's global RNG)

    kernel = kernels.kernel((*key, G.dtype), body, example)
    out = None if kernel is None else kernels.run(kernel, G, *args)
    return None if out is None or bool(out.isnan().any()) else out


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
    n = G.shape[0]
    ranks = ((n - 1) // 2, n // 2)
    comparators, rows = _pruned_network(n, ranks)
    body = partial(kernels.median_body, comparators, rows)
    if (out := _fused(("median", n), body, G)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, _, (a, b) in _order_statistics(G, ranks):
        out[cols] = kernels.middle(a, b)
    return out


def trimmed_mean(G: Tensor, f: int) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest
    values of each coordinate and average the n - 2f others; n > 2f. NaN counts as +inf.

    Needs only the values of ranks f and n-1-f (`kernels.clamped_mean`).
    """
    _require("trimmed_mean", G, f)
    n = G.shape[0]
    if f == 0:
        return G.mean(0)
    comparators, rows = _pruned_network(n, (f, n - 1 - f))
    body = partial(kernels.trimmed_mean_body, comparators, rows, f)
    if (out := _fused(("trimmed_mean", n, f), body, G)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, X, (lo, hi) in _order_statistics(G, (f, n - 1 - f)):
        out[cols] = kernels.clamped_mean(X.unbind(0), lo, hi, f)
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
    would otherwise score nothing). Stays on D's device: no host sync per round. A winner's
    column becomes +inf (no longer a neighbour) and its score +inf; infinite scores of
    remaining vectors (non-finite rows) become the largest float, so they still win before
    picked ones. On CPU `kernels.bulyan_select` runs the same rounds in C: ~1 us a round,
    against ~20 us of torch calls here.
    """
    if (picked := kernels.bulyan_select(D, f, theta)) is not None:
        return picked
    n = D.shape[0]
    others = D.clone().fill_diagonal_(INF)
    picked_score = torch.zeros(n, dtype=D.dtype, device=D.device)  # + INF once picked
    big = torch.finfo(D.dtype).max
    picked = []
    for r in range(theta):
        k = min(max(n - r - f - 2, 1), n - 1)
        scores = others.topk(k, dim=1, largest=False).values.sum(1)
        winner = scores.nan_to_num_(nan=big, posinf=big).add_(picked_score).argmin().view(1)
        others.index_fill_(1, winner, INF)
        picked_score.index_fill_(0, winner, INF)
        picked.append(winner)
    return torch.cat(picked)


def bulyan(G: Tensor, f: int) -> Tensor:
    """Bulyan (El Mhamdi, Guerraoui, Rouault 2018) over Krum; n >= 4f+3.

    Select theta = n - 2f vectors by repeated Krum (`_bulyan_select`), then per coordinate
    average the beta = theta - 2f selected values closest to the selected set's (true)
    coordinate-wise median, the lower value on ties in distance. Those values lie within
    beta - 1 ranks of the middle, so only the ranks of `_median_band` are computed.
    """
    _require("bulyan", G, f)
    n = G.shape[0]
    theta = n - 2 * f
    beta = theta - 2 * f
    if n == 1:
        return G[0].clone()
    chosen = _bulyan_select(pairwise_sq_distances(G), f, theta)
    ranks = _median_band(theta, beta)
    comparators, rows = _pruned_network(theta, ranks)
    body = partial(kernels.bulyan_body, beta, comparators, rows)
    if (out := _fused(("bulyan", n, f), body, G, chosen)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, _, band in _order_statistics(G, ranks, chosen):
        out[cols] = kernels.closest_mean(band, beta)
    return out


def _median_band(theta: int, beta: int) -> tuple[int, ...]:
    """The ranks, of theta sorted values, that can hold the beta closest to their median:
    beta - 1 on each side of the middle value(s), capped at theta. The band is symmetric
    about the median, so its own median is the median of all theta."""
    lo = max(0, (theta - 1) // 2 - (beta - 1))
    return tuple(range(lo, theta - lo))


def _weiszfeld(K: Tensor, nu: float, tol: float, max_iter: int, tiny: float) -> tuple[Tensor, int]:
    """Smoothed Weiszfeld in weight space; returns (beta, iterations run).

    K is the Gram matrix of m points plus, as its last row/column, the origin (all relative
    to a common centre). z = sum_j beta_j x_j, so ||z - x_i||^2 = (beta - e_i)^T K (beta - e_i)
    and ||z||^2 is the same form against the origin's row. On CPU `kernels.weiszfeld` runs
    the same iterations in C: ~1 us each, against ~40 us of torch calls.
    """
    if (done := kernels.weiszfeld(K, nu, tol, max_iter, tiny)) is not None:
        return done
    m = K.shape[0] - 1
    Kx, k_origin, sq = K[:m, :m], K[:m, m], K.diagonal()[:m]
    origin_sq = float(K[m, m])
    beta = torch.full((m,), 1.0 / m, dtype=K.dtype, device=K.device)  # z_0 = the mean
    for it in range(1, max_iter + 1):  # few torch calls per iteration: each costs ~3-10 us
        Kb = Kx @ beta
        zz = beta @ Kb  # ||z||^2, all relative to the centre
        # b_i = 1 / max(nu, ||z - x_i||), ||z - x_i||^2 = zz - 2 Kb_i + sq_i
        b = torch.add(sq, Kb, alpha=-2.0).add_(zz).clamp_min_(nu * nu).rsqrt_()
        new = b / b.sum()
        step = new - beta
        step_sq, z_sq, z_origin = torch.stack([step @ Kx @ step, zz, beta @ k_origin]).tolist()
        beta = new
        z_norm = math.sqrt(max(z_sq - 2.0 * z_origin + origin_sq, 0.0))  # ||z - origin||
        if math.sqrt(max(step_sq, 0.0)) <= tol * max(z_norm, tiny):
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
