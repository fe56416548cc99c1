"""Simulated attacks: shapes, formulas, determinism, and their effect on the rules."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from strategies.attacks import (
    alie,
    alie_z,
    bulyan_coord,
    byzantine_ranks,
    flip_labels,
    gaussian,
    ipm,
    sign_flip,
)
from strategies.registry import ATTACKS
from strategies.rules import build_rule
from strategies.rules.mean import mean
from strategies.rules.median import median


def aggregate(rule: str, G: torch.Tensor, f: int) -> torch.Tensor:
    """The rule as it runs in a step: its transform with default options, from its init."""
    transform = build_rule(rule)
    return transform.update(G, f, transform.init())[0]


def honest_grads(h: int = 9, d: int = 64, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(h, d, generator=g)


GRADIENT_ATTACKS = [a for a in ATTACKS.names() if not ATTACKS.get(a).extra["data_side"]]


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_gradient_attacks_return_f_rows_of_honest_shape(name):
    H = honest_grads().double()
    out = ATTACKS.get(name).build(H, 3, 12, torch.Generator().manual_seed(1))
    assert out.shape == (3, 64)
    assert out.dtype == H.dtype and out.device == H.device


def test_label_flip_is_data_side():
    entry = ATTACKS.get("label_flip")
    assert entry.extra["data_side"]
    assert entry.build(honest_grads(), 2, 10, None) is None
    assert [a for a in ATTACKS.names() if ATTACKS.get(a).extra["data_side"]] == ["label_flip"]
    y = torch.tensor([0, 1, 2, 9, 5])
    assert flip_labels(y, 10).tolist() == [9, 8, 7, 0, 4]
    assert torch.equal(flip_labels(flip_labels(y, 10), 10), y)


def test_unknown_attack_lists_valid_names():
    with pytest.raises(KeyError, match="unknown attack 'lie'; valid: sign_flip, gaussian, alie"):
        ATTACKS.get("lie")


def test_sign_flip_and_ipm_formulas():
    H = honest_grads()
    mu = H.mean(0)
    assert torch.allclose(sign_flip(H, 2, 11), -mu.expand(2, -1))
    assert torch.allclose(ipm(H, 2, 11), -0.1 * mu.expand(2, -1))
    assert torch.allclose(ipm(H, 1, 10, eps=3.0)[0], -3.0 * mu)


def test_gaussian_std_and_seed():
    H = honest_grads(d=20_000)
    a = gaussian(H, 2, 11, torch.Generator().manual_seed(5))
    b = gaussian(H, 2, 11, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(a.std().item() - 200.0) < 5.0
    assert abs(a.mean().item()) < 5.0
    small = gaussian(H, 1, 11, torch.Generator().manual_seed(5), std=0.5)
    assert abs(small.std().item() - 0.5) < 0.02


@pytest.mark.parametrize("n,f", [(10, 2), (25, 5), (50, 12), (100, 20), (7, 1)])
def test_alie_z_matches_the_paper(n, f):
    s = math.floor(n / 2 + 1) - f
    expected = NormalDist().inv_cdf((n - f - s) / (n - f))
    assert alie_z(n, f) == pytest.approx(expected, abs=1e-9)


def test_alie_formula_and_override():
    H = honest_grads()
    z = alie_z(20, 4)
    std = H.std(0, correction=1)
    out = alie(H, 4, 20)
    assert torch.allclose(out, (H.mean(0) - z * std).expand(4, -1), atol=1e-6)
    assert torch.allclose(alie(H, 1, 20, z=2.5)[0], H.mean(0) - 2.5 * std, atol=1e-6)


def test_alie_z_undefined_raises():
    with pytest.raises(ValueError, match="pass z explicitly"):
        alie_z(5, 3)  # s = 0: the attackers already hold a majority


def test_bulyan_coord_formula():
    H = honest_grads(h=8, d=400)
    out = bulyan_coord(H, 2, 10, coord=7, scale=0.5)
    mu = H.mean(0)
    others = torch.arange(400) != 7
    assert torch.equal(out[:, others], mu[others].expand(2, -1))
    rms_std = H.std(0, correction=1).pow(2).mean().sqrt()
    assert out[0, 7].item() == pytest.approx(mu[7].item() + 0.5 * 20.0 * rms_std.item(), rel=1e-5)
    assert torch.equal(out[0], out[1])


def test_bulyan_coord_fools_norm_rules_but_not_bulyan():
    n, f, coord = 11, 2, 3
    shifts = {}
    for d in (400, 6400):
        H = honest_grads(h=n - f, d=d, seed=d)
        G = torch.cat([H, bulyan_coord(H, f, n, coord=coord)])
        sd = H.std(0)[coord]
        shifts[d] = {
            rule: abs((aggregate(rule, G, f)[coord] - H.mean(0)[coord]) / sd).item()
            for rule in ("krum", "geomed", "bulyan")
        }
    # Krum returns a Byzantine vector; geomed moves O(sqrt(d)) stds; Bulyan stays O(1)
    for d, s in shifts.items():
        assert s["krum"] > 0.5 * math.sqrt(d)
        assert s["geomed"] > 0.05 * math.sqrt(d)
        assert s["bulyan"] < 3.0
    assert shifts[6400]["geomed"] > 3 * shifts[400]["geomed"]


def test_nan_attack():
    out = ATTACKS.get("nan").build(honest_grads(), 2, 10, None)
    assert bool(torch.isnan(out).all())


def test_ipm_pulls_the_mean_but_not_the_median():
    n, f = 11, 4
    H = honest_grads(h=n - f, d=32, offset=5.0) * 0.1 + 1.0
    G = torch.cat([H, ipm(H, f, n, eps=50.0)])
    mu = H.mean(0)
    assert torch.all(mean(G, f) * mu < 0)  # the mean points the other way
    assert (median(G, f) - mu).norm() < 0.5 * mu.norm()
    assert torch.all(median(G, f) * mu > 0)


def test_byzantine_ranks_are_seeded_sorted_and_distinct():
    a = byzantine_ranks(20, 6, seed=3)
    assert a == byzantine_ranks(20, 6, seed=3)
    assert a == sorted(set(a)) and len(a) == 6 and all(0 <= r < 20 for r in a)
    others = {tuple(byzantine_ranks(20, 6, seed=s)) for s in range(10)}
    assert len(others) > 1
    assert byzantine_ranks(5, 0, seed=1) == []
    assert byzantine_ranks(4, 4, seed=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        byzantine_ranks(4, 5, seed=1)
