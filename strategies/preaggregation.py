"""Pre-aggregation steps that run before any rule of `strategies.rules`, as transforms
(`strategies.transforms`) that `chain` composes with the rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from strategies.distances import CHUNK_BYTES, column_chunks, combine, geometry
from strategies.registry import PREAGGREGATORS
from strategies.transforms import Transform, chain, stateless


def bucketing(G: Tensor, s: int, generator: torch.Generator | None = None) -> Tensor:
    """Bucketing (Karimireddy et al. 2022): permute the n rows at random and average
    consecutive buckets of s rows (the last bucket may be smaller): ceil(n/s) rows out.

    Run the rule afterwards with the same f on n' = ceil(n/s) rows: each Byzantine worker
    spoils at most one bucket, so at most f buckets are bad
    (`strategies.rules.check_workers(rule, n', f)`).
    The permutation comes from `generator` (on CPU or on G's device).
    """
    if s < 1:
        raise ValueError(f"bucket size must be >= 1, got {s}")
    n, d = G.shape
    device = generator.device if generator is not None else G.device
    perm = torch.randperm(n, generator=generator, device=device).to(G.device)
    full, rest = divmod(n, s)
    out = torch.empty(full + (rest > 0), d, dtype=G.dtype, device=G.device)
    # Gather by column chunks (in cache), not a (buckets x n) weight-matrix product: with BLAS
    # a NaN row would poison every bucket through 0 * NaN = NaN.
    for cols in column_chunks(d, n, G.element_size(), CHUNK_BYTES):
        rows = G[:, cols].index_select(0, perm)
        torch.mean(rows[: full * s].view(full, s, -1), dim=1, out=out[:full, cols])
        if rest:
            torch.mean(rows[full * s :], dim=0, out=out[full, cols])
    return out


def nnm(G: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023): replace each x_i by the mean of its
    n - f nearest neighbours, itself included (distances from `pairwise_sq_distances`)."""
    n = G.shape[0]
    if not 0 <= f < n:
        raise ValueError(f"nnm needs 0 <= f < n, got f={f}, n={n}")
    _, D, finite = geometry(G)
    D = D.clone().fill_diagonal_(-1.0)  # itself first, even against duplicates
    neighbours = D.topk(n - f, dim=1, largest=False).indices
    weights = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    weights.scatter_(1, neighbours, 1.0 / (n - f))
    return combine(G, weights, finite)


@dataclass
class BucketingParams:
    bucket_size: int = field(default=2, metadata={"help": "bucketing: gradients averaged per "
                                                  "bucket", "ge": 1})


@PREAGGREGATORS.register("bucketing", "average random buckets of `strategy.bucket_size` rows; "
                         "the rule keeps f and its requirement applies to the ceil(n/s) buckets",
                         params=BucketingParams)
def build_bucketing(params: BucketingParams) -> Transform:
    s = params.bucket_size

    def update(G: Tensor, f: int, state: None, generator: torch.Generator | None = None
               ) -> tuple[Tensor, None]:
        return bucketing(G, s, generator), state

    return Transform(lambda: None, update, rows=lambda n: math.ceil(n / s))


@PREAGGREGATORS.register("nnm", "replace each row by the mean of its n-f nearest neighbours "
                         "(Allouah et al. 2023)")
def build_nnm(params: None) -> Transform:
    return stateless(nnm)


def preaggregation_chain(names: list[str], params: object, rule: Transform) -> Transform:
    """The named steps in order, then `rule`, as one transform; `params` carries every step's
    options by name (e.g. the strategy config's bucket_size)."""
    steps = []
    for name in names:
        entry = PREAGGREGATORS.get(name)
        options = None if entry.params is None else entry.params(
            **{f.name: getattr(params, f.name) for f in fields(entry.params)})
        steps.append(entry.build(options))
    return chain(*steps, rule)
