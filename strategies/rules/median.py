"""Coordinate-wise median (Yin et al. 2018)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from strategies import kernels
from strategies.order_stats import fused, order_statistics, pruned_network
from strategies.registry import RULES
from strategies.rules import majority, require
from strategies.transforms import Transform, stateless


def median(G: Tensor, f: int = 0) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018); n >= 2f+1.

    For even n this is the true median, the average of the two middle values (torch.median
    would return the lower one). NaN counts as +inf.
    """
    require("median", G, f)
    n = G.shape[0]
    ranks = ((n - 1) // 2, n // 2)
    comparators, rows = pruned_network(n, ranks)
    body = partial(kernels.median_body, comparators, rows)
    if (out := fused(("median", n), body, G)) is not None:
        return out
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for cols, _, (a, b) in order_statistics(G, ranks):
        out[cols] = kernels.middle(a, b)
    return out


@RULES.register("median", "coordinate-wise median (Yin et al. 2018)", min_workers=majority,
                requirement="n >= 2f+1")
def build(params: None) -> Transform:
    return stateless(median)
