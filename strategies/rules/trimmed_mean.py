"""Coordinate-wise trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from strategies import kernels
from strategies.order_stats import fused, order_statistics, pruned_network
from strategies.registry import RULES
from strategies.rules import majority, require
from strategies.transforms import Transform, stateless


def trimmed_mean(G: Tensor, f: int) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest
    values of each coordinate and average the n - 2f others; n > 2f. NaN counts as +inf.

    Needs only the values of ranks f and n-1-f (`kernels.clamped_mean`).
    """
    require("trimmed_mean", G, f)
    n = G.shape[0]
    if f == 0:
        return G.mean(0)
    comparators, rows = pruned_network(n, (f, n - 1 - f))
    body = partial(kernels.trimmed_mean_body, comparators, rows, f)
    if (out := fused(("trimmed_mean", n, f), body, G)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, X, (lo, hi) in order_statistics(G, (f, n - 1 - f)):
        out[cols] = kernels.clamped_mean(X.unbind(0), lo, hi, f)
    return out


@RULES.register("trimmed_mean", "per coordinate, drop the f largest and f smallest, average "
                "the rest", min_workers=majority, requirement="n >= 2f+1")
def build(params: None) -> Transform:
    return stateless(trimmed_mean)
