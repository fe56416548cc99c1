"""Aggregation rules against slow references written from the papers' definitions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from strategies import distances, kernels, order_stats
from strategies.preaggregation import bucketing, nnm, preaggregation_chain
from strategies.registry import PREAGGREGATORS, RULES
from strategies.rules import build_rule, check_workers
from strategies.rules import bulyan as bulyan_rule
from strategies.rules import median as median_rule
from strategies.rules import trimmed_mean as trimmed_mean_rule
from strategies.rules.bulyan import _bulyan_select, _median_band, bulyan
from strategies.rules.centered_clip import centered_clip
from strategies.rules.geomed import geometric_median
from strategies.rules.krum import krum
from strategies.rules.mean import mean
from strategies.rules.median import median
from strategies.rules.multi_krum import multi_krum
from strategies.rules.sign_vote import sign_vote
from strategies.rules.trimmed_mean import trimmed_mean
from strategies.transforms import stateless

# --------------------------------------------------------------------------- references
# Plain Python / NumPy float64 loops, straight from the definitions in docs/algorithms.md.


def aggregate(rule: str, G: torch.Tensor, f: int) -> torch.Tensor:
    """The rule as it runs in a step: its transform with default options, from its init."""
    transform = build_rule(rule)
    return transform.update(G, f, transform.init())[0]


def ref_median(X: np.ndarray) -> np.ndarray:
    n, d = X.shape
    out = np.empty(d)
    for j in range(d):
        v = sorted(X[:, j])
        out[j] = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return out


def ref_trimmed_mean(X: np.ndarray, f: int) -> np.ndarray:
    n, d = X.shape
    return np.array([sum(sorted(X[:, j])[f : n - f]) / (n - 2 * f) for j in range(d)])


def ref_krum_scores(X: np.ndarray, f: int, k: int | None = None) -> list[float]:
    n = len(X)
    k = n - f - 2 if k is None else k
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((X[i] - X[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[:k]))
    return scores


def ref_krum_index(X: np.ndarray, f: int) -> int:
    scores = ref_krum_scores(X, f)
    return min(range(len(X)), key=lambda i: (scores[i], i))


def ref_multi_krum(X: np.ndarray, f: int, m: int) -> np.ndarray:
    scores = ref_krum_scores(X, f)
    order = sorted(range(len(X)), key=lambda i: (scores[i], i))
    return X[order[:m]].mean(0)


def ref_bulyan(X: np.ndarray, f: int) -> np.ndarray:
    n, d = X.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining, selected = list(range(n)), []
    while len(selected) < theta:
        # Krum on the remaining set; n_r - f - 2 neighbours, at least 1 (see bulyan)
        k = max(len(remaining) - f - 2, 1)
        scores = ref_krum_scores(X[remaining], f, k)
        best = min(range(len(remaining)), key=lambda i: (scores[i], i))
        selected.append(remaining.pop(best))
    S = X[selected]
    return np.array([ref_closest_mean(S[:, j], beta) for j in range(d)])


def ref_closest_mean(values: np.ndarray, beta: int) -> float:
    """Mean of the beta values closest to the median, the lower ones on ties in distance."""
    values = sorted(values)
    med = ref_median(np.array(values)[:, None])[0]
    return sum(sorted(values, key=lambda v: abs(v - med))[:beta]) / beta


def ref_geomed(X: np.ndarray, nu: float, tol: float, max_iter: int) -> np.ndarray:
    z = X.mean(0)
    for _ in range(max_iter):
        b = [1.0 / max(nu, float(np.linalg.norm(z - x))) for x in X]
        new = sum(bi * x for bi, x in zip(b, X, strict=True)) / sum(b)
        done = np.linalg.norm(new - z) <= tol * max(np.linalg.norm(z), 1e-38)
        z = new
        if done:
            break
    return z


def ref_centered_clip(X: np.ndarray, prev: np.ndarray, tau: float, iters: int) -> np.ndarray:
    v = prev.copy()
    for _ in range(iters):
        step = np.zeros_like(v)
        for x in X:
            r = np.linalg.norm(x - v)
            step += (x - v) * min(1.0, tau / r)
        v = v + step / len(X)
    return v


def ref_sign_vote(X: np.ndarray) -> np.ndarray:
    n, d = X.shape
    out = np.zeros(d)
    for j in range(d):
        votes = sum(1 if X[i, j] > 0 else -1 if X[i, j] < 0 else 0 for i in range(n))
        out[j] = (votes > 0) - (votes < 0)
    return out


def ref_nnm(X: np.ndarray, f: int) -> np.ndarray:
    n = len(X)
    out = np.empty_like(X)
    for i in range(n):
        dists = [float(np.sum((X[i] - X[j]) ** 2)) for j in range(n)]
        order = sorted(range(n), key=lambda j: (j != i, dists[j], j))  # itself first
        out[i] = X[order[: n - f]].mean(0)
    return out


# --------------------------------------------------------------------------- helpers

CASES = [(n, f) for n in (7, 11, 15) for f in (1, 2, 3)]


def rand(n: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = 1.0 + torch.rand(n, 1, generator=g)  # unequal spreads: distinct Krum scores
    return offset + torch.randn(n, d, generator=g) * spread


def np64(G: torch.Tensor) -> np.ndarray:
    return G.double().numpy()


def close(a: torch.Tensor, b: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.double().numpy(), b, rtol=rtol, atol=atol)


@pytest.fixture(params=["torch", "c_kernels"])
def gram_path(request, monkeypatch):
    """Run a distance-based test on both paths: torch (the suite runs with SQUALL_COMPILE=0)
    and the C distance kernels (Gram matrix, Bulyan's selection, Weiszfeld), with the
    order-statistic kernels still off (compiling those takes seconds)."""
    if request.param == "c_kernels":
        monkeypatch.setenv("SQUALL_COMPILE", "1")
        monkeypatch.setattr(kernels, "enabled", lambda G: False)
        if not kernels.gram_applies(torch.zeros(1, 16)):
            pytest.skip("no C compiler for the distance kernels")
    return request.param


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("n,f", CASES)
def test_median_and_trimmed_mean_match_reference(n, f):
    for d, seed in ((1, 0), (37, 1), (300, 2)):
        G = rand(n, d, seed)
        close(median(G, f), ref_median(np64(G)))
        close(trimmed_mean(G, f), ref_trimmed_mean(np64(G), f))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 17])
def test_median_even_n_is_average_of_middle_values(n, monkeypatch):
    monkeypatch.setattr(order_stats, "_NETWORK_CHUNK_BYTES", 1024)  # 256-column chunks
    G = rand(n, 513, seed=n)
    close(median(G), ref_median(np64(G)))


def test_trimmed_mean_ties_huge_outliers_and_infinities():
    g = torch.Generator().manual_seed(7)
    G = torch.randint(-3, 4, (11, 500), generator=g).float()  # many ties
    for f in range(6):
        close(trimmed_mean(G, f), ref_trimmed_mean(np64(G), f))
    # dropped outliers do not cost the kept values any precision (no sum-then-subtract)
    G = rand(11, 300, seed=5)
    G[[2, 7]] = 1e30
    G[4] = -1e30
    close(trimmed_mean(G, 3), ref_trimmed_mean(np64(G), 3))
    inf, nan = float("inf"), float("nan")

    def tm(*values: float, f: int = 1) -> float:
        return trimmed_mean(torch.tensor(values)[:, None], f).item()

    assert tm(inf, 1.0, 2.0, 3.0, -inf) == 2.0  # at most f infinities per side: dropped
    assert tm(inf, inf, 2.0, 3.0, 4.0) == inf  # more: kept
    assert tm(-inf, -inf, 2.0, 3.0, 4.0) == -inf
    assert math.isnan(tm(inf, inf, -inf, -inf, 4.0))
    assert tm(nan, nan, 2.0, 3.0, 4.0) == inf  # NaN counts as +inf
    assert tm(nan, 1.0, 2.0, 3.0, 4.0) == 3.0
    assert tm(inf, inf, inf, inf, inf, f=2) == inf


def test_bulyan_keeps_the_closest_values_on_a_large_common_offset():
    """Near ties, `below + above >= 2 median` rounds the sum away: with a common offset 1e4x
    the spread it kept a farther value in some coordinates. The differences do not round."""
    f, n, d = 1, 7, 20_000
    g = torch.Generator().manual_seed(5)
    G = (1e4 + torch.randn(n, d, generator=g)).float()
    chosen = _bulyan_select(distances.pairwise_sq_distances(G), f, n - 2 * f)
    S = np64(G[chosen])
    expected = np.array([ref_closest_mean(S[:, j], n - 4 * f) for j in range(d)])
    close(bulyan(G, f), expected, rtol=0, atol=2e-3)  # float32 rounding of a mean near 1e4


def test_rules_on_the_sort_path_match_references(monkeypatch):
    # CUDA takes one torch.sort instead of the network: run that path here
    network_or_sort = order_stats.order_statistics
    for module in (median_rule, trimmed_mean_rule, bulyan_rule):  # where the rules look it up
        monkeypatch.setattr(module, "order_statistics",
                            lambda G, ranks, rows=None: network_or_sort(G, ranks, rows, False))
    for n, f in ((7, 1), (11, 2), (16, 3)):
        G = rand(n, 60, seed=n)
        G[1, :5] = float("nan")
        X = np64(G.nan_to_num(nan=float("inf")))
        close(median(G), ref_median(X))
        close(trimmed_mean(G, f), ref_trimmed_mean(X, f))
        G = rand(n, 60, seed=n)
        close(bulyan(G, f), ref_bulyan(np64(G), f))


def test_order_statistic_rules_accept_zero_columns():
    G = torch.empty(7, 0)
    for out in (median(G), trimmed_mean(G, 2), bulyan(G, 1)):
        assert out.shape == (0,)


def test_median_and_trimmed_mean_known_values():
    G = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [4.0, 3.0]])
    assert median(G).tolist() == [3.0, 1.5]  # torch.median would give [2, 0]
    assert trimmed_mean(G, 1).tolist() == [3.0, 1.5]
    G5 = torch.tensor([[5.0], [1.0], [4.0], [2.0], [3.0]])
    assert trimmed_mean(G5, 2).item() == 3.0
    assert trimmed_mean(G5, 1).item() == 3.0
    assert trimmed_mean(G5, 0).item() == 3.0


def test_median_chunked_columns_against_torch_sort(monkeypatch):
    # many chunks, the last overlapping
    monkeypatch.setattr(order_stats, "_NETWORK_CHUNK_BYTES", 256)
    G = rand(13, 1000, seed=3)
    assert torch.equal(median(G), torch.sort(G, dim=0).values[6])


@pytest.mark.parametrize("N", [1, 2, 4, 8, 16])
def test_pairwise_network_sorts_every_01_input(N):
    # 0-1 principle: a comparator network that sorts every input of 0s and 1s sorts every
    # input. All 2^N of them at once: bit b of wire i is bit i of b; min/max are and/or.
    b = np.arange(1 << N)
    wires = [(b >> i & 1).astype(bool) for i in range(N)]
    for i, j in order_stats.pairwise_network(N):
        wires[i], wires[j] = wires[i] & wires[j], wires[i] | wires[j]
    assert all((wires[i] <= wires[i + 1]).all() for i in range(N - 1))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 10, 16, 17, 18, 32, 33])
def test_order_statistics_network_equals_torch_sort(m, monkeypatch):
    # several chunks, the last overlapping
    monkeypatch.setattr(order_stats, "_NETWORK_CHUNK_BYTES", 4096)
    inf = float("inf")
    G = rand(m, 1001, seed=m)
    G[:, :40] = G[:, :40].round()  # ties
    G[0, 40:45] = float("nan")
    G[-1, 45:50] = inf
    G[m // 2, 50:55] = -inf
    G[:, 55:60] = float("nan")  # every value NaN
    rows = torch.tensor([i for i in range(m) if i % 3 != 1])
    for sel in (None, rows):
        X = G if sel is None else G[sel]
        k = X.shape[0]
        expected = torch.sort(X.nan_to_num(nan=inf, posinf=inf, neginf=-inf), 0).values
        for ranks in ((0, k - 1), ((k - 1) // 2, k // 2), (k // 4, k - 1 - k // 4), range(k)):
            ranks = tuple(ranks)
            for network in (True, False):
                got = torch.empty(len(ranks), G.shape[1])
                for cols, _, stats in order_stats.order_statistics(G, ranks, sel, network):
                    got[:, cols] = torch.stack(stats)
                assert torch.equal(got, expected[list(ranks)]), (ranks, network)


def test_selection_network_is_pruned_and_batched():
    # what makes the CPU path fast (benchmarks/aggregators.md): trimmed mean at n = 16, f = 3
    # and n = 32, f = 7 keeps a fraction of the comparators and runs them as few torch calls
    assert len(order_stats.pruned_network(16, (3, 12))[0]) < len(order_stats.pairwise_network(16))
    assert len(order_stats.pruned_network(32, (7, 24))[0]) < len(order_stats.pairwise_network(32))
    assert len(order_stats.selection_program(16, (3, 12))[0]) <= 30
    assert len(order_stats.selection_program(32, (7, 24))[0]) <= 62


@pytest.mark.parametrize("n,f", [(n, f) for n, f in CASES if n >= 2 * f + 3])
@pytest.mark.usefixtures("gram_path")
def test_krum_and_multi_krum_match_reference(n, f):
    for d, seed in ((5, 10), (64, 11), (500, 12)):
        G = rand(n, d, seed)
        X = np64(G)
        assert torch.equal(krum(G, f), G[ref_krum_index(X, f)])
        close(multi_krum(G, f), ref_multi_krum(X, f, n - f))
        close(multi_krum(G, f, m=2), ref_multi_krum(X, f, 2))


@pytest.mark.usefixtures("gram_path")
def test_krum_selection_survives_a_large_common_offset():
    # Rows share an offset 1000x their spread: a float32 Gram of the raw rows loses the
    # distances to cancellation (it picks the wrong row for all of these seeds); the centred
    # Gram used by pairwise_sq_distances keeps the reference's choice.
    for seed in range(3):
        G = rand(15, 20_000, seed, offset=1000.0)
        assert torch.equal(krum(G, 3), G[ref_krum_index(np64(G), 3)])


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3), (12, 2), (8, 1)])
@pytest.mark.usefixtures("gram_path")
def test_bulyan_matches_reference(n, f):
    for d, seed in ((3, 20), (50, 21), (400, 22)):
        G = rand(n, d, seed)
        close(bulyan(G, f), ref_bulyan(np64(G), f))


@pytest.mark.usefixtures("gram_path")
def test_bulyan_with_ties_matches_reference():
    # small integers: tied Krum scores (lowest index wins) and tied values around the median
    for n, f in ((7, 1), (11, 2), (15, 3), (16, 3)):
        g = torch.Generator().manual_seed(n)
        G = torch.randint(-2, 3, (n, 300), generator=g).float()
        close(bulyan(G, f), ref_bulyan(np64(G), f))


def test_closest_mean_keeps_every_closer_value():
    # median 0, beta = 3: both 0s, then the lower of -1 and 1. (The first window of three
    # sorted values with the smallest radius, [-1, -1, 0], would leave a 0 out.)
    Y = torch.tensor([-2.0, -1.0, -1.0, 0.0, 0.0, 1.0, 2.0])[:, None]
    band = list(_median_band(7, 3))
    assert kernels.closest_mean(Y[band], 3).item() == pytest.approx(-1 / 3)
    Y = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.0, 2.0])[:, None]  # median 0.5
    assert kernels.closest_mean(Y[list(_median_band(6, 2))], 2).item() == 0.5
    assert kernels.closest_mean(Y[list(_median_band(6, 4))], 4).item() == 0.25


def test_closest_mean_of_the_median_band_matches_reference():
    # Bulyan sorts only the ranks of _median_band: they must hold the beta closest values
    g = torch.Generator().manual_seed(0)
    for theta in range(1, 16):
        Y = torch.randint(-3, 4, (theta, 60), generator=g).float().sort(0).values
        for beta in range(theta % 2 or 2, theta + 1, 2):  # beta = theta - 2f
            band = list(_median_band(theta, beta))
            expected = [ref_closest_mean(Y[:, j].numpy(), beta) for j in range(Y.shape[1])]
            close(kernels.closest_mean(Y[band], beta), np.array(expected))


@pytest.mark.parametrize("n,f", [(1, 0), (3, 1), (7, 2), (11, 3), (15, 0)])
@pytest.mark.usefixtures("gram_path")
def test_geomed_matches_reference(n, f):
    G = rand(n, 40, seed=30 + n)
    ref = ref_geomed(np64(G), nu=1e-6, tol=1e-9, max_iter=1000)
    close(geometric_median(G, f, tol=1e-9), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "tau,iters,offset",
    [(0.5, 1, 0.0), (3.0, 3, 0.0), (100.0, 2, 0.0), (2.0, 3, 300.0), (1e4, 3, 300.0)],
)
@pytest.mark.usefixtures("gram_path")
def test_centered_clip_matches_reference(tau, iters, offset):
    G = rand(9, 30, seed=40, offset=offset)
    prev = rand(1, 30, seed=41, offset=offset)[0]
    X = np64(G)
    close(
        centered_clip(G, 2, prev=prev, tau=tau, iters=iters),
        ref_centered_clip(X, np64(prev[None])[0], tau, iters),
    )
    close(
        centered_clip(G, 2, tau=tau, iters=iters),
        ref_centered_clip(X, np.zeros(30), tau, iters),
    )


def test_sign_vote_matches_reference_and_ties_give_zero():
    G = rand(8, 200, seed=50)
    G[:, :10] = 0.0
    close(sign_vote(G), ref_sign_vote(np64(G)))
    signs = torch.tensor(
        [
            [1.0, 1.0, -1.0, 1.0],
            [-1.0, 1.0, -1.0, 0.0],
            [1.0, -1.0, 1.0, -1.0],
            [-1.0, 1.0, 1.0, 0.0],
        ]
    )
    assert sign_vote(signs).tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("n", [2, 5, 9])
@pytest.mark.usefixtures("gram_path")
def test_pairwise_sq_distances(n):
    G = rand(n, 300, seed=60 + n, offset=50.0)
    X = np64(G)
    D = distances.pairwise_sq_distances(G)
    exact = np.array([[np.sum((a - b) ** 2) for b in X] for a in X])
    assert D.shape == (n, n)
    assert torch.all(D.diagonal() == 0)
    assert torch.equal(D, D.T)
    np.testing.assert_allclose(D.numpy(), exact, rtol=1e-4, atol=1e-6 * exact.max())


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan"])
@pytest.mark.usefixtures("gram_path")
def test_far_outliers_are_never_selected(rule):
    n, f, d = 11, 2, 20
    honest = rand(n - f, d, seed=70)
    for where in ([0, 1], [4, 10], [9, 10]):  # Byzantine rows at the start, middle, end
        G = torch.empty(n, d)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[where] = True
        G[~mask] = honest
        G[mask] = 1e4 + torch.arange(f * d, dtype=torch.float32).view(f, d)
        out = aggregate(rule, G, f)
        assert bool((out >= honest.min(0).values).all() and (out <= honest.max(0).values).all())
        if rule == "krum":
            assert any(torch.equal(out, h) for h in honest)


@pytest.mark.usefixtures("gram_path")
def test_multi_krum_averages_exactly_the_honest_rows():
    honest = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    G = torch.cat([honest, torch.tensor([[50.0, 50.0], [-60.0, 40.0]])])
    assert torch.allclose(multi_krum(G, 2), honest.mean(0))


@pytest.mark.usefixtures("gram_path")
def test_krum_ties_go_to_the_lowest_index():
    # integer data: the tied scores are exactly equal in floating point
    G = torch.tensor([[-1.0], [1.0], [-1.0], [1.0], [-1.0], [1.0], [10.0]])
    assert ref_krum_scores(np64(G), 2)[:6] == [4.0] * 6
    assert krum(G, 2).item() == -1.0  # index 0
    G = torch.tensor([[10.0], [1.0], [-1.0], [1.0], [-1.0], [1.0], [-1.0]])
    assert krum(G, 2).item() == 1.0  # index 1
    assert torch.equal(multi_krum(G, 2, m=2), torch.tensor([0.0]))  # indices 1 and 2


@pytest.mark.usefixtures("gram_path")
def test_geomed_known_answers():
    # centrally symmetric set around c: the geometric median is c
    c = torch.tensor([3.0, -1.0, 2.0])
    G = torch.cat([c + torch.eye(3), c - torch.eye(3)])
    assert torch.allclose(geometric_median(G), c)
    # in 1-D the geometric median is the median
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert abs(geometric_median(line).item() - 2.0) < 1e-4
    # a triangle with an angle >= 120 degrees: the median is that vertex
    tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.1]])
    assert torch.allclose(geometric_median(tri), torch.zeros(2), atol=1e-5)


@pytest.mark.usefixtures("gram_path")
def test_geomed_iterates_to_tolerance_not_a_fixed_count():
    G = rand(9, 20, seed=80)
    loose = geometric_median(G, max_iter=3)
    tight = geometric_median(G)
    ref = torch.from_numpy(ref_geomed(np64(G), 1e-6, 1e-12, 5000)).float()
    assert (tight - ref).norm() < 1e-3 * (loose - ref).norm()


@pytest.mark.usefixtures("gram_path")
def test_centered_clip_bounds_an_outlier_and_reduces_to_mean_without_clipping():
    G = rand(9, 10, seed=90)
    assert torch.allclose(centered_clip(G, tau=1e9, iters=1), G.mean(0), atol=1e-6)
    prev = G[1:].mean(0)
    clean = centered_clip(G, 1, prev=prev, tau=1.0, iters=1)
    far = G.clone()
    far[0] = 1e6
    dirty = centered_clip(far, 1, prev=prev, tau=1.0, iters=1)
    # one row moves one step by at most tau / n; changing it moves the result <= 2 tau / n
    assert (dirty - clean).norm() <= 2 * 1.0 / 9 + 1e-5
    assert (far.mean(0) - clean).norm() > 1e4


@pytest.mark.parametrize(
    "rule",
    [
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "bulyan",
        "geomed",
        "centered_clip",
        "sign_vote",
    ],
)
@pytest.mark.usefixtures("gram_path")
def test_nan_rows_do_not_reach_the_output(rule):
    n, f = 11, 2
    G = rand(n, 33, seed=100)
    G[[3, 7]] = float("nan")
    out = aggregate(rule, G, f)
    assert out.shape == (33,)
    assert bool(torch.isfinite(out).all())


@pytest.mark.usefixtures("gram_path")
def test_centered_clip_nan_row_contributes_nothing():
    G = rand(9, 12, seed=102)
    prev = rand(1, 12, seed=103)[0]
    still = G.clone()
    still[5] = prev  # a row at v has a zero step: the same as contributing nothing
    G[5] = float("nan")
    expected = centered_clip(still, 2, prev=prev, tau=0.5, iters=1)
    assert torch.allclose(centered_clip(G, 2, prev=prev, tau=0.5, iters=1), expected)


def test_mean_propagates_nan():
    G = rand(5, 4, seed=101)
    G[0, 0] = float("nan")
    assert math.isnan(mean(G)[0].item())


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_rule():
    assert RULES.names() == [  # one module each in strategies/rules/, found in name order
        "bulyan",
        "centered_clip",
        "geomed",
        "krum",
        "mean",
        "median",
        "multi_krum",
        "sign_vote",
        "trimmed_mean",
    ]
    G = rand(5, 8, seed=7)
    assert torch.equal(aggregate("geomed", G, 1), geometric_median(G, 1))


def test_unknown_aggregator_lists_valid_names():
    with pytest.raises(KeyError) as err:
        RULES.get("krummy")
    msg = str(err.value)
    assert "unknown aggregator 'krummy'" in msg
    assert "valid: bulyan, centered_clip, geomed, krum, mean, median, multi_krum" in msg


@pytest.mark.parametrize(
    "rule,need",
    [
        ("mean", lambda f: 1),
        ("median", lambda f: 2 * f + 1),
        ("trimmed_mean", lambda f: 2 * f + 1),
        ("krum", lambda f: 2 * f + 3),
        ("multi_krum", lambda f: 2 * f + 3),
        ("bulyan", lambda f: 4 * f + 3),
        ("geomed", lambda f: 2 * f + 1),
        ("centered_clip", lambda f: 2 * f + 1),
        ("sign_vote", lambda f: 2 * f + 1),
    ],
)
def test_min_workers_boundaries(rule, need):
    a = RULES.get(rule)
    for f in range(4):
        if rule == "mean" and f > 0:
            continue
        assert a.min_workers(f) == need(f)
        assert check_workers(rule, need(f), f) is None
        reason = check_workers(rule, need(f) - 1, f)
        assert reason == (
            f"{rule} needs {a.requirement} = {need(f)} workers for f={f}, got {need(f) - 1}"
        )
        with pytest.raises(ValueError, match="needs"):
            aggregate(rule, rand(need(f) - 1, 3, seed=f) if need(f) > 1 else torch.empty(0, 3), f)
        assert aggregate(rule, rand(need(f), 3, seed=f), f).shape == (3,)


def test_check_workers_message_and_negative_f():
    assert check_workers("krum", 5, 2) == "krum needs n >= 2f+3 = 7 workers for f=2, got 5"
    assert check_workers("median", 3, -1) is not None


def test_multi_krum_m_out_of_range():
    G = rand(9, 4, seed=110)
    for m in (0, 8):
        with pytest.raises(ValueError, match="strategy.m"):
            multi_krum(G, 2, m=m)
    assert torch.allclose(multi_krum(G, 2, m=1), krum(G, 2))


# --------------------------------------------------------------------------- preaggregation


def test_bucketing_shapes_sums_and_seed():
    G = rand(10, 6, seed=120)
    out = bucketing(G, 3, torch.Generator().manual_seed(0))
    assert out.shape == (4, 6)  # ceil(10 / 3)
    sizes = torch.tensor([3.0, 3.0, 3.0, 1.0])[:, None]
    assert torch.allclose((out * sizes).sum(0), G.sum(0), atol=1e-5)
    again = bucketing(G, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, bucketing(G, 3, torch.Generator().manual_seed(1)))
    perm = bucketing(G, 1, torch.Generator().manual_seed(0))
    assert torch.equal(perm.sort(0).values, G.sort(0).values)


def test_bucketing_nan_spoils_at_most_f_buckets():
    G = rand(12, 5, seed=121)
    G[[2, 9]] = float("nan")
    out = bucketing(G, 3, torch.Generator().manual_seed(4))
    bad = (~torch.isfinite(out)).any(1).sum().item()
    assert 1 <= bad <= 2


@pytest.mark.parametrize("n,f", [(5, 1), (9, 2), (12, 3)])
@pytest.mark.usefixtures("gram_path")
def test_nnm_matches_reference(n, f):
    G = rand(n, 25, seed=130 + n)
    close(nnm(G, f), ref_nnm(np64(G), f))


@pytest.mark.usefixtures("gram_path")
def test_nnm_keeps_honest_rows_finite_with_nan_rows():
    G = rand(9, 7, seed=140)
    G[4] = float("nan")
    out = nnm(G, 2)
    finite = torch.isfinite(out).all(1)
    assert finite.tolist() == [i != 4 for i in range(9)]


def test_preaggregation_registry_and_composition():
    assert PREAGGREGATORS.names() == ["bucketing", "nnm"]
    identity = stateless(lambda G, f: G)
    three = SimpleNamespace(bucket_size=3)
    assert preaggregation_chain(["bucketing"], three, identity).rows(10) == 4
    with pytest.raises(KeyError, match="valid: bucketing, nnm"):
        PREAGGREGATORS.get("shuffle")
    G = rand(9, 4, seed=150)
    pipeline = preaggregation_chain(["nnm", "bucketing"], SimpleNamespace(bucket_size=2), identity)
    out, _ = pipeline.update(G, 2, pipeline.init(), torch.Generator().manual_seed(0))
    assert out.shape == (5, 4)
    expected = bucketing(nnm(G, 2), 2, torch.Generator().manual_seed(0))
    assert torch.allclose(out, expected)
    alone = preaggregation_chain([], SimpleNamespace(bucket_size=2), identity)
    assert torch.equal(alone.update(G, 2, alone.init(), None)[0], G)


def test_chain_returns_the_rules_state_and_keeps_none_hidden():
    """centered_clip's previous aggregate is state the chain hands back, not keeps."""
    pipeline = preaggregation_chain(["nnm"], None, build_rule("centered_clip"))
    state0 = pipeline.init()
    assert state0 == (None, {"prev": None})
    G1, G2 = rand(5, 6, seed=1), rand(5, 6, seed=2)
    first, state1 = pipeline.update(G1, 1, state0)
    assert torch.equal(state1[1]["prev"], first) and state0 == (None, {"prev": None})
    second, _ = pipeline.update(G2, 1, state1)
    again, _ = pipeline.update(G2, 1, state1)  # the same state in, the same answer out
    assert torch.equal(second, again)
    assert torch.equal(second, centered_clip(nnm(G2, 1), 1, prev=first))


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", RULES.names())
def test_cuda_matches_cpu(rule):
    G = rand(15, 4099, seed=160)
    f = 3
    cpu = aggregate(rule, G, f)
    gpu = aggregate(rule, G.cuda(), f)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(
        distances.pairwise_sq_distances(G.cuda()).argsort(1).cpu(),
        distances.pairwise_sq_distances(G).argsort(1),
    )
    out = nnm(G.cuda(), f)
    torch.testing.assert_close(out.cpu(), nnm(G, f), rtol=1e-4, atol=1e-5)
