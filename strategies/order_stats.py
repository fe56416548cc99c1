"""A few order statistics per column, without a sort (pure torch, any device).

Median, trimmed mean and Bulyan need a few order statistics of each column, not a sort. On
CPU torch.sort along dim 0 costs ~300 ns per column for small n, so they come from a
sorting network run as vectorised torch.minimum / torch.maximum over column chunks, pruned
to the comparators the wanted ranks depend on: only those ranks come out right. Once its
compiled kernel is ready (`kernels`: one loop over the columns, same results to the bit), a
rule on CPU runs that instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from strategies import kernels
from strategies.distances import INF

# Column chunks for the selection networks: the input chunk and two scratch buffers of about
# this many bytes each stay in L2/L3 across the network's 6-10 passes, while each torch call
# (~2 us) still covers 7k-26k columns. Measured (n = 16 and 32, d = 1e5 and 1e6): 1 and
# 2 MiB within 10% of each other, 512 KiB and 4 MiB up to 1.5x slower.
_NETWORK_CHUNK_BYTES = 1 << 20


def pairwise_network(N: int) -> list[tuple[int, int]]:
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
def pruned_network(m: int, ranks: tuple[int, ...]) -> tuple[kernels.Comparators, tuple]:
    """(comparators, rows): a network on m rows that leaves rank ranks[k] on row rows[k].

    Comparators are (i, j, keep_min, keep_max): row i gets the min, row j the max, and only
    the outputs some wanted rank depends on are kept. The network is the pairwise one on
    N = 2^k wires whose last N - m carry +inf: comparators against them do nothing but move
    a value to another wire, so they are dropped and the wire is relabelled instead.
    """
    N = 1 << max(0, (m - 1).bit_length())
    row: list[int | None] = [*range(m), *[None] * (N - m)]  # row held by each wire; None: +inf
    comparators = []
    for i, j in pairwise_network(N):
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
def selection_program(m: int, ranks: tuple[int, ...]) -> tuple[tuple[_Op, ...], tuple]:
    """(ops, outputs): batched ops leaving rank ranks[k] of m rows at outputs[k] = (buffer, row).

    Each comparator runs in the layer after the last one that touched its rows, and writes
    its outputs to the other scratch buffer (the one not holding the row's current value),
    so no op overwrites what another op of its layer reads. Per layer, the comparators with
    the same output side, row distance and buffers become one strided op: ~30 torch calls
    for n = 16 instead of ~100 (each costs ~2 us, a 16k-column row ~2 us of work).
    """
    comparators, outs = pruned_network(m, ranks)
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
        ops, outs = selection_program(m, ranks)
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


def nan_to_inf(x: Tensor) -> Tensor:
    return torch.nan_to_num_(x, nan=INF, posinf=INF, neginf=-INF)


def order_statistics(
    G: Tensor, ranks: tuple[int, ...], rows: Tensor | None = None, network: bool | None = None
) -> Iterator[tuple[slice, Tensor, list[Tensor]]]:
    """Yield (columns, X, stats): X = G[rows][:, columns] with NaN read as +inf, stats[k] the
    row of rank ranks[k] of X sorted along dim 0. All valid until the next item.

    On CPU a pruned sorting network (`selection_program`) over chunks of columns, on CUDA
    one torch.sort; both give the same values. `network` forces the choice (tests). Chunks
    all have the same width (the last one overlaps the one before), so the views are built
    once. The network reads G in place: minimum / maximum propagate NaN to every output, so
    a chunk is copied and NaN mapped to +inf only when its first output has one.
    """
    n, d = G.shape
    m = n if rows is None else rows.numel()
    if not (G.device.type == "cpu" if network is None else network):
        X = nan_to_inf(G.clone() if rows is None else G.index_select(0, rows))
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
            X = nan_to_inf(X if rows is not None else X.clone())
            stats = select(X)
        yield cols, X, stats


def fused(key: tuple, body: Callable, G: Tensor, *args: Tensor) -> Tensor | None:
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
