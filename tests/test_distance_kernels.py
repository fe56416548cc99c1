"""The C distance kernels (strategies/distances.c). The Gram matrix against float64
products: every shape edge (rows not a multiple of the tile, columns not a multiple of the
vector width, several column blocks), strided rows, centring, extra rows, thread counts,
non-finite rows, and how the distance rules pick the first centre with it; Bulyan's
selection and the Weiszfeld loop against their torch versions; building and its failures.
The rules themselves run on both paths in test_aggregators.py (the `gram_path` fixture)."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from test_aggregators import (
    close,
    np64,
    rand,
    ref_bulyan,
    ref_geomed,
    ref_krum_index,
    ref_multi_krum,
)

from strategies import distances, kernels
from strategies.rules.bulyan import _bulyan_select, bulyan
from strategies.rules.geomed import _geomed_gram, _weiszfeld, geometric_median
from strategies.rules.krum import krum
from strategies.rules.multi_krum import multi_krum

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="the Gram kernel needs a C compiler"
)


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv("SQUALL_COMPILE", "1")
    monkeypatch.setattr(kernels, "enabled", lambda G: False)  # no order-statistic compiles


def torch_path(fn, *args):
    """fn(*args) with the C kernels off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUALL_COMPILE", "0")
        return fn(*args)


def reference(rows: torch.Tensor, center: torch.Tensor | None) -> np.ndarray:
    X = rows if center is None else rows - center  # the kernel centres in float32 too
    X = X.double().numpy()
    return X @ X.T


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 17, 33])
@pytest.mark.parametrize("d", [1, 15, 16, 17, 1000, kernels.GRAM_BLOCK + 37])
def test_gram_kernel_matches_float64_products(m, d):
    G = rand(m, d, seed=m * d)
    for center in (None, G[m // 2].clone() + 0.5):
        K = kernels.gram(G, center)
        assert K is not None and K.dtype == torch.float64 and torch.equal(K, K.T)
        ref = reference(G, center)
        np.testing.assert_allclose(K.numpy(), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_gram_kernel_takes_extra_rows_and_strided_rows():
    big = rand(9, 3000, seed=1)
    G, extra = big[:6, 7:2007], big[6:, 100:2100]  # rows with a stride, as views
    center = big[0, 500:2500]
    K = kernels.gram(G, center, extra)
    ref = reference(torch.cat([G, extra]), center)
    np.testing.assert_allclose(K.numpy(), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    assert kernels.gram(big.T.contiguous().T) is None  # columns with a stride: torch's path
    assert kernels.gram(big.double()) is None and kernels.gram(big.half()) is None
    ref = reference(big, None)
    close(distances.gram(big.T.contiguous().T), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_gram_kernel_gives_the_same_bits_for_any_thread_count():
    G = rand(10, 3 * kernels.GRAM_BLOCK + 5, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.gram(G, G[3])
        torch.set_num_threads(3)
        three = kernels.gram(G, G[3])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_gram_kernel_propagates_non_finite_rows_like_matmul():
    G = rand(6, 500, seed=3)
    G[1, 10] = float("nan")
    G[4, 20] = float("inf")
    K = kernels.gram(G)
    finite = torch.isfinite(K.diagonal())
    assert finite.tolist() == [True, False, True, True, False, True]
    assert torch.isfinite(K[[0, 2, 3, 5]][:, [0, 2, 3, 5]]).all()


def test_gram_kernel_is_off_when_compiling_is_off_or_off_cpu(monkeypatch):
    G = torch.ones(3, 40)
    assert kernels.gram_applies(G)
    assert not kernels.gram_applies(torch.ones(3, 40, device="meta"))
    assert not kernels.gram_applies(G, torch.ones(1, 39))  # widths differ
    monkeypatch.setenv("SQUALL_COMPILE", "0")
    assert not kernels.gram_applies(G) and kernels.gram(G) is None


def test_a_missing_compiler_is_reported_once_and_matmul_stays(caplog, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels._c_library.cache_clear()
    try:
        G = rand(12, 300, seed=4)
        with caplog.at_level(logging.WARNING, logger="strategies.kernels"):
            assert kernels.gram(G) is None and kernels.gram(G) is None
            K = distances.gram(G)
        ref = reference(G, None)
        close(K, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1
        assert "distance kernels" in failures[0] and "/nonexistent/cc" in failures[0]
        assert "SQUALL_COMPILE=0" in failures[0]
    finally:
        kernels._c_library.cache_clear()


def test_a_failing_compile_says_what_the_compiler_said(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="error"):
        kernels._build(broken)
    assert not list(tmp_path.glob("squall_*/*.so"))  # nothing half-written left to load


def test_the_library_is_built_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    first = kernels._build(kernels._C_SOURCE)
    stamp = first.stat().st_mtime_ns
    assert kernels._build(kernels._C_SOURCE) == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setattr(kernels, "_cpu_features", lambda: "another CPU")
    assert kernels._build(kernels._C_SOURCE) != first  # native code is per CPU


def counting_gram(monkeypatch) -> list:
    """Record the centre of every Gram matrix the kernel computes."""
    centres = []
    gram = kernels.gram

    def spy(G, center=None, extra=None):
        out = gram(G, center, extra)
        assert out is not None
        centres.append(None if center is None else center.clone())
        return out

    monkeypatch.setattr(kernels, "gram", spy)
    return centres


def test_offset_rows_take_one_pass_centred_on_row_0(monkeypatch):
    n, f = 12, 2
    G = rand(n, 3000, seed=5, offset=1e3)  # a common component 1e3 x the spread
    centres = counting_gram(monkeypatch)
    assert krum(G, f).equal(G[ref_krum_index(np64(G), f)])
    close(multi_krum(G, f), ref_multi_krum(np64(G), f, n - f), rtol=1e-6, atol=1e-3)
    assert len(centres) == 2 and all(c.equal(G[0]) for c in centres)


def test_a_far_row_0_is_recentred_and_a_non_finite_one_starts_raw(monkeypatch):
    n, f = 12, 2
    G = rand(n, 3000, seed=6, offset=50.0)
    G[0] += 1e4  # a Byzantine row 0, far from the bulk
    centres = counting_gram(monkeypatch)
    assert krum(G, f).equal(G[ref_krum_index(np64(G), f)])
    assert len(centres) == 2 and centres[0].equal(G[0]) and not centres[1].equal(G[0])

    for bad in (float("nan"), 1e25):  # 1e25: finite, but its square overflows float32
        centres.clear()
        H = G.clone()
        H[0, 7] = bad
        close(geometric_median(H), ref_geomed(np64(H[1:]), 1e-6, 1e-6, 1000), 1e-5, 1e-3)
        assert torch.equal(centres[0].nan_to_num(), H[0].nan_to_num())  # first on row 0
        assert centres[1] is None  # not all finite: raw, then centred on a central row
        assert len(centres) == 3 and not torch.equal(centres[2], H[0])


@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (11, 2), (16, 3), (33, 7)])
def test_bulyan_selection_in_c_picks_what_the_torch_rounds_pick(n, f):
    theta = n - 2 * f
    g = torch.Generator().manual_seed(n)
    cases = [
        distances.pairwise_sq_distances(rand(n, 50, seed=n)),
        torch.randint(0, 4, (n, n), generator=g).double(),  # ties everywhere
    ]
    inf = cases[0].clone()
    inf[n // 2, :] = inf[:, n // 2] = float("inf")  # a non-finite row
    inf[n // 2, n // 2] = 0.0
    for D in [*cases, inf]:
        D = (D + D.T).fill_diagonal_(0.0)
        picked = kernels.bulyan_select(D, f, theta)
        assert picked is not None and picked.dtype == torch.int64
        assert picked.tolist() == torch_path(_bulyan_select, D, f, theta).tolist()
    assert f == 0 or n // 2 not in picked.tolist()  # f >= 1: every score has finite terms


def test_bulyan_selection_in_c_matches_the_reference_rule_end_to_end():
    n, f = 15, 3
    G = rand(n, 400, seed=7)
    G[4] += 50.0  # far rows: never selected
    G[9] -= 50.0
    calls = []
    select = kernels.bulyan_select
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "bulyan_select", lambda *a: calls.append(select(*a)) or calls[-1])
        out = bulyan(G, f)
    assert calls and calls[0] is not None and not {4, 9} & set(calls[0].tolist())
    close(out, ref_bulyan(np64(G), f))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
def test_weiszfeld_in_c_iterates_like_the_torch_loop(n):
    G = rand(n, 300, seed=n, offset=3.0)
    G[0] += 40.0  # an outlier: more iterations
    K, _ = _geomed_gram(G)
    for tol, max_iter in ((1e-6, 1000), (1e-12, 7), (1e-6, 1), (1e-6, 0)):
        beta, it = kernels.weiszfeld(K, 1e-6, tol, max_iter, 1e-38)
        ref_beta, ref_it = torch_path(_weiszfeld, K, 1e-6, tol, max_iter, 1e-38)
        assert it == ref_it and beta.dtype == torch.float64
        torch.testing.assert_close(beta, ref_beta, rtol=1e-12, atol=1e-14)
    assert it == 0 and torch.equal(beta, torch.full((n,), 1.0 / n, dtype=torch.float64))
