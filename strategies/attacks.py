"""Simulated Byzantine attacks.

The f Byzantine workers collude and see the honest gradients of the step (omniscient).
Each attack is ``attack(honest: Tensor[h, d], f, n, generator, **params) -> Tensor[f, d]``
on honest's device; `label_flip` instead acts on the worker's data (`flip_labels`) and its
registry entry is marked ``data_side``: the driver keeps the gradient the worker computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from strategies import blocks
from strategies.registry import ATTACKS


class AttackUndefined(ValueError):
    """The attack cannot be forged for these n and f (e.g. ALIE's default z when the attackers
    and the arrivals leave no majority to win over). The driver treats it like too few
    arrivals: the step is skipped (or stops the run with strategy.on_too_few=fail)."""


def _repeat(v: Tensor, f: int) -> Tensor:
    return v.unsqueeze(0).expand(f, -1).clone()


def _honest_std(honest: Tensor) -> Tensor:
    """Per-coordinate std of the honest gradients, unbiased (n-1) as in Baruch et al.'s
    estimate of the population spread (and ByzFL's ALIE); 0 with a single honest worker."""
    if honest.shape[0] < 2:
        return torch.zeros_like(honest[0])
    return honest.std(dim=0, correction=1)


def sign_flip(honest: Tensor, f: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Every Byzantine worker sends -mean(honest)."""
    return _repeat(-honest.mean(0), f)


def gaussian(
    honest: Tensor,
    f: int,
    n: int,
    generator: torch.Generator | None = None,
    std: float = 200.0,
) -> Tensor:
    """Independent N(0, std^2 I) vectors."""
    device = generator.device if generator is not None else honest.device
    noise = torch.randn(f, honest.shape[1], generator=generator, device=device)
    return (noise * std).to(device=honest.device, dtype=honest.dtype)


def alie_z(n: int, f: int) -> float:
    """z of "A little is enough" (Baruch et al. 2019): s = floor(n/2 + 1) - f workers must be
    won over, z = Phi^-1((n - f - s) / (n - f)). Raises `AttackUndefined` where that
    probability is not in (0, 1): n <= 2, or f >= floor(n/2 + 1)."""
    s = math.floor(n / 2 + 1) - f
    p = (n - f - s) / (n - f) if n > f else 0.0
    if not 0.0 < p < 1.0:
        raise AttackUndefined(f"alie: z is undefined for n={n}, f={f} (p={p:.3g}); "
                              "pass z explicitly")
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def alie(
    honest: Tensor,
    f: int,
    n: int,
    generator: torch.Generator | None = None,
    z: float | None = None,
) -> Tensor:
    """ALIE (Baruch et al. 2019): mean - z * std per coordinate, z from `alie_z` unless given."""
    z = alie_z(n, f) if z is None else z
    return _repeat(honest.mean(0) - z * _honest_std(honest), f)


def ipm(
    honest: Tensor,
    f: int,
    n: int,
    generator: torch.Generator | None = None,
    eps: float = 0.1,
) -> Tensor:
    """Inner-product manipulation (Xie et al. 2020): -eps * mean(honest)."""
    return _repeat(-eps * honest.mean(0), f)


def bulyan_coord(
    honest: Tensor,
    f: int,
    n: int,
    generator: torch.Generator | None = None,
    coord: int = 0,
    scale: float = 1.0,
) -> Tensor:
    """The attack of El Mhamdi et al. 2018 on norm-based rules.

    Every coordinate equals the honest mean (inside the honest spread) except `coord`, set to
    mean + scale * sqrt(d) * s where s = sqrt(mean_k std_k^2) is the RMS honest std. The shift
    is therefore scale * sqrt(sum_k std_k^2): scale times the typical distance of an honest
    vector to the honest mean. In squared distance the Byzantine vectors sit at about
    (1 + scale^2) sum_k std_k^2 from each honest one, while two honest vectors are 2 sum_k std_k^2
    apart, so for scale <~ 1 Krum selects them and the geometric median moves toward them by a
    fraction of the shift, i.e. O(sqrt(d)) per-coordinate stds. Bulyan keeps only values close
    to the coordinate-wise median, so its output moves by O(std_coord), i.e. O(1/sqrt(d)) of
    that leeway.
    """
    mu = honest.mean(0)
    d = blocks.whole_width(honest.shape[1])  # on a block: the statistic spans every block
    rms_std = (blocks.total(_honest_std(honest).pow(2).sum()) / d).sqrt()
    byz = mu.clone()
    if 0 <= (local := coord - blocks.start()) < honest.shape[1]:
        byz[local] += scale * math.sqrt(d) * rms_std
    return _repeat(byz, f)


def nan(honest: Tensor, f: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """All-NaN gradients."""
    return torch.full((f, honest.shape[1]), float("nan"), dtype=honest.dtype, device=honest.device)


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Label flipping, applied to the Byzantine worker's data: y -> num_classes - 1 - y."""
    return num_classes - 1 - y


def label_flip(honest: Tensor, f: int, n: int, generator: torch.Generator | None = None) -> None:
    """Data-side attack (see `flip_labels`): there is no gradient to substitute."""
    return None


def _register(fn: Callable, description: str, options: tuple[str, ...] = (),
              data_side: bool = False) -> None:
    """Register `fn` as an attack; `options` names the byzantine.* settings it takes."""
    ATTACKS.register(fn.__name__, description,
                     extra={"options": options, "data_side": data_side})(fn)


_register(sign_flip, "the negated honest mean")
_register(gaussian, "independent N(0, std^2 I) vectors (`byzantine.std`)", ("std",))
_register(alie, "a little is enough: mean - z std per coordinate (Baruch et al. 2019; "
          "`byzantine.z`, default from n and f)", ("z",))
_register(ipm, "inner-product manipulation: -eps x the honest mean (Xie et al. 2020; "
          "`byzantine.eps`)", ("eps",))
_register(bulyan_coord, "one coordinate shifted by scale x sqrt(d) honest stds, inside "
          "Bulyan's leeway (El Mhamdi et al. 2018; `byzantine.scale`)", ("scale",))
_register(nan, "all-NaN gradients")
_register(label_flip, "the Byzantine workers train on flipped labels y -> C-1-y", data_side=True)


def byzantine_ranks(n: int, f: int, seed: int) -> list[int]:
    """The f Byzantine worker ranks among n, sorted, fixed by seed."""
    if not 0 <= f <= n:
        raise ValueError(f"need 0 <= f <= n, got f={f}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:f].tolist())
