"""Multi-Krum: the average of the m best Krum scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from strategies.distances import combine, geometry
from strategies.registry import RULES
from strategies.rules import require
from strategies.rules.krum import krum_scores
from strategies.transforms import Transform


def multi_krum(G: Tensor, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum: average of the m vectors with the lowest Krum scores (m = n - f by
    default, ties to the lowest index). n >= 2f+3, 1 <= m <= n - f."""
    require("multi_krum", G, f)
    n = G.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise ValueError(f"strategy.m must be in [1, n-f] = [1, {n - f}] for multi_krum, got {m}")
    _, D, finite = geometry(G)
    chosen = torch.argsort(krum_scores(D, f), stable=True)[:m]
    weights = torch.zeros(1, n, dtype=torch.float64, device=G.device)
    weights[0, chosen] = 1.0 / m
    return combine(G, weights, finite)[0]


@dataclass
class MultiKrumParams:
    m: int = field(default=0, metadata={"help": "multi_krum: average the m best-scored "
                                               "gradients (0: n - f)", "ge": 0})


@RULES.register("multi_krum", "average of the `strategy.m` best Krum scores (default n-f)",
                min_workers=lambda f: 2 * f + 3, requirement="n >= 2f+3", params=MultiKrumParams)
def build(params: MultiKrumParams) -> Transform:
    def update(G: Tensor, f: int, state: None, generator: torch.Generator | None = None
               ) -> tuple[Tensor, None]:
        m = min(params.m, G.shape[0] - f) if params.m else None  # fewer rows arrived
        return multi_krum(G, f, m), state

    return Transform(lambda: None, update)
