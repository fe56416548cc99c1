"""Krum (Blanchard et al. 2017)."""

from __future__ import annotations

from torch import Tensor

from strategies.distances import INF, pairwise_sq_distances
from strategies.registry import RULES
from strategies.rules import require
from strategies.transforms import Transform, stateless


def krum_scores(D: Tensor, f: int) -> Tensor:
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
    require("krum", G, f)
    scores = krum_scores(pairwise_sq_distances(G), f)
    return G[scores.argmin()].clone()


@RULES.register("krum", "the gradient with the smallest sum of squared distances to its "
                "n-f-2 nearest others (Blanchard et al. 2017)", min_workers=lambda f: 2 * f + 3,
                requirement="n >= 2f+3")
def build(params: None) -> Transform:
    return stateless(krum)
