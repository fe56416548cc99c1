"""Centered clipping (Karimireddy, He, Jaggi 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from strategies.distances import combine, geometry
from strategies.registry import RULES
from strategies.rules import majority, require
from strategies.transforms import Transform


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
    require("centered_clip", G, f)
    n, d = G.shape
    p = torch.zeros(1, d, dtype=G.dtype, device=G.device) if prev is None else prev
    p = p.reshape(1, d).to(G.dtype)
    K, _, finite = geometry(G, extra=p)
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
    v = combine(G, weights, finite)[0]
    return v if prev is None else v.add_(p[0], alpha=float(1.0 - a.sum()))


@dataclass
class CenteredClipParams:
    tau: float = field(default=1.0, metadata={"help": "centered_clip: clipping radius", "gt": 0})
    iters: int = field(default=3, metadata={"help": "centered_clip: clipping iterations per step",
                                            "ge": 1})


@RULES.register("centered_clip", "clipping around the previous aggregate, radius `strategy.tau`, "
                "`strategy.iters` rounds (Karimireddy et al. 2021)", min_workers=majority,
                requirement="n >= 2f+1", params=CenteredClipParams)
def build(params: CenteredClipParams) -> Transform:
    """State: the previous aggregate ({"prev": None} before the first step)."""

    def update(G: Tensor, f: int, state: dict, generator: torch.Generator | None = None
               ) -> tuple[Tensor, dict]:
        out = centered_clip(G, f, state["prev"], params.tau, params.iters)
        return out, {"prev": out}

    return Transform(lambda: {"prev": None}, update)
