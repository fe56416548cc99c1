"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018) over Krum."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from strategies import kernels
from strategies.distances import INF, pairwise_sq_distances
from strategies.order_stats import fused, order_statistics, pruned_network
from strategies.registry import RULES
from strategies.rules import require
from strategies.transforms import Transform, stateless


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
    require("bulyan", G, f)
    n = G.shape[0]
    theta = n - 2 * f
    beta = theta - 2 * f
    if n == 1:
        return G[0].clone()
    chosen = _bulyan_select(pairwise_sq_distances(G), f, theta)
    ranks = _median_band(theta, beta)
    comparators, rows = pruned_network(theta, ranks)
    body = partial(kernels.bulyan_body, beta, comparators, rows)
    if (out := fused(("bulyan", n, f), body, G, chosen)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, _, band in order_statistics(G, ranks, chosen):
        out[cols] = kernels.closest_mean(band, beta)
    return out


def _median_band(theta: int, beta: int) -> tuple[int, ...]:
    """The ranks, of theta sorted values, that can hold the beta closest to their median:
    beta - 1 on each side of the middle value(s), capped at theta. The band is symmetric
    about the median, so its own median is the median of all theta."""
    lo = max(0, (theta - 1) // 2 - (beta - 1))
    return tuple(range(lo, theta - lo))


@RULES.register("bulyan", "n-2f gradients by iterated Krum, then per coordinate the mean "
                "of the n-4f values closest to the median (El Mhamdi et al. 2018)",
                min_workers=lambda f: 4 * f + 3, requirement="n >= 4f+3")
def build(params: None) -> Transform:
    return stateless(bulyan)
