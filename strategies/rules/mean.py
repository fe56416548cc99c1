"""The plain average: the non-robust baseline."""

from __future__ import annotations

from torch import Tensor

from strategies.registry import RULES
from strategies.rules import require
from strategies.transforms import Transform, stateless


def mean(G: Tensor, f: int = 0) -> Tensor:
    """Plain average (not robust, f is ignored)."""
    require("mean", G, f)
    return G.mean(0)


@RULES.register("mean", "average (not robust)", min_workers=lambda f: 1,
                requirement="n >= 1")
def build(params: None) -> Transform:
    return stateless(mean)
