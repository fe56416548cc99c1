"""Moniqua and CHOCO compressors: recovery bounds, real sizes, simulated gossip."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strategies.compression import (
    DenseMessage,
    MoniquaMessage,
    QSGDMessage,
    SignMessage,
    centred_mod,
    choco_compress,
    dense_encode,
    moniqua_decode,
    moniqua_delta,
    moniqua_encode,
    moniqua_modulus,
    moniqua_theta,
    qsgd_compress,
    qsgd_tau,
    shared_dither,
    sign_compress,
    wrapped,
)
from strategies.consensus import Choco, Moniqua, build_method
from strategies.registry import COMPRESSORS
from strategies.topology import mixing_matrix

F64 = torch.float64
SETTINGS = [(1, "nearest"), (2, "nearest"), (2, "stochastic"), (4, "nearest")]
SETTINGS += [(4, "stochastic"), (8, "nearest"), (8, "stochastic")]
SETTINGS += [(1, "dither"), (2, "dither"), (8, "dither")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dither(rounding: str, count: int, seed: int) -> torch.Tensor | None:
    return shared_dither(count, seed) if rounding == "dither" else None


def _options(compress: str, *, bits: int = 2, rounding: str = "dither", gamma: float = 1.0,
             block_size: int = 0, choco_compressor: str = "sign") -> SimpleNamespace:
    """The gossip options a consensus method is built from."""
    return SimpleNamespace(compress=compress, bits=bits, rounding=rounding,
                           block_size=block_size, gamma=gamma, theta_margin=1.2,
                           choco_compressor=choco_compressor)


def _row(w: torch.Tensor, i: int) -> dict[int, float]:
    """Row i of W as {rank: weight}, self included, zero weights dropped."""
    return {j: float(w[i, j]) for j in range(w.shape[0]) if w[i, j] != 0}


# ------------------------------------------------------------------ Moniqua basics


def test_delta_and_modulus_follow_the_paper() -> None:
    assert moniqua_delta(2, "stochastic") == 0.25
    assert moniqua_delta(2, "nearest") == 0.125
    assert moniqua_delta(1, "nearest") == 0.25
    assert moniqua_delta(8, "nearest") == 2.0**-9
    assert moniqua_modulus(1.0, 2, "stochastic") == pytest.approx(4.0, rel=1e-15)
    assert moniqua_modulus(1.5, 2, "nearest") == pytest.approx(4.0, rel=1e-15)
    assert moniqua_modulus(0.5, 1, "nearest") == pytest.approx(2.0, rel=1e-15)
    assert moniqua_modulus(0.1, 8, "nearest") * (1 - 2**-8) / 2 >= 0.1


def test_one_bit_stochastic_is_rejected_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="strategy.rounding"):
        moniqua_encode(torch.zeros(3), 1.0, 1, "stochastic")
    with pytest.raises(ValueError, match="strategy.rounding"):
        moniqua_delta(2, "floor")
    with pytest.raises(ValueError, match="strategy.bits"):
        moniqua_encode(torch.zeros(3), 1.0, 3, "nearest")
    with pytest.raises(ValueError, match="theta"):
        moniqua_encode(torch.zeros(3), 0.0, 2, "nearest")


def test_centred_mod_range() -> None:
    v = torch.linspace(-10, 10, 2001, dtype=F64)
    r = centred_mod(v, 4.0)
    assert bool((r >= -2).all() and (r < 2).all())
    shifts = (r - v) / 4.0  # r = v - 4k for an integer k
    torch.testing.assert_close(shifts, shifts.round(), rtol=0, atol=1e-12)
    assert centred_mod(torch.tensor([2.0, -2.0, 1.0]), 4.0).tolist() == [-2.0, -2.0, 1.0]


@st.composite
def _bounded_pair(draw: st.DrawFn) -> tuple:
    bits, rounding = draw(st.sampled_from(SETTINGS))
    theta = draw(st.floats(1e-3, 1e2))
    d = draw(st.integers(1, 24))
    centre = st.floats(-1e3, 1e3)
    y = draw(st.lists(centre, min_size=d, max_size=d))
    t = draw(st.lists(st.floats(-1.0, 1.0), min_size=d, max_size=d))
    seed = draw(st.integers(0, 2**31 - 1))
    return bits, rounding, theta, torch.tensor(y, dtype=F64), torch.tensor(t, dtype=F64), seed


@settings(max_examples=300, deadline=None)
@given(_bounded_pair())
# Found by hypothesis: with B rounded down, x = theta lands on a tie that rounds up.
@example((4, "nearest", 70.875, torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), 0))
def test_moniqua_recovery_error_is_at_most_delta_b(case: tuple) -> None:
    bits, rounding, theta, x_local, t, seed = case
    x = x_local + theta * t
    # |x - x_local| <= theta, up to the float64 rounding of the sum itself.
    assert float((x - x_local).abs().max()) <= theta * (1 + 1e-12) + 1e-13 * 1e3
    dither = _dither(rounding, x.numel(), seed)
    msg = moniqua_encode(x, theta, bits, rounding, generator=_gen(seed), dither=dither)
    x_hat = moniqua_decode(msg, x_local, dither)
    bound = moniqua_delta(bits, rounding) * msg.modulus
    slack = 1e-12 * (1 + float(x.abs().max()))  # float64 rounding, no wrap
    assert bool(((x_hat - x).abs() <= bound + slack).all())


def test_moniqua_recovery_on_float32_models() -> None:
    gen = _gen(3)
    for bits, rounding in SETTINGS:
        x_local = torch.randn(5000, generator=gen)
        theta = 0.01
        x = x_local + theta * (2 * torch.rand(5000, generator=gen) - 1)
        dither = _dither(rounding, 5000, 9)
        msg = moniqua_encode(x, theta, bits, rounding, generator=gen, dither=dither)
        x_hat = moniqua_decode(msg, x_local, dither)
        assert x_hat.dtype == torch.float32
        bound = moniqua_delta(bits, rounding) * msg.modulus
        assert bool(((x_hat - x).abs() <= bound + 1e-6).all())


def test_nearest_ties_round_down_so_the_closed_bound_holds() -> None:
    # 2-bit nearest: B = 2 theta / (1 - 1/4) rounded up to its 1-byte code, s B = B / 4. At
    # |x - y| = 3/8 B (the largest theta this B allows) (x / B) mod 1 sits exactly halfway
    # between two levels. Rounding that tie up would land on q B - y = +B/2, which the
    # centred modulo wraps to -B/2 (error B - delta B).
    modulus = float(moniqua_encode(torch.zeros(1), 1.5, 2, "nearest").modulus[0])
    assert modulus >= moniqua_modulus(1.5, 2, "nearest")
    x = torch.tensor([0.375, -0.375, 0.125, -0.125], dtype=F64) * modulus
    assert ((x / modulus) * 8).tolist() == [3.0, -3.0, 1.0, -1.0]  # exact ties
    x_hat = moniqua_decode(moniqua_encode(x, 1.5, 2, "nearest"), torch.zeros(4, dtype=F64))
    expected = torch.tensor([0.25, -0.5, 0.0, -0.25], dtype=F64) * modulus
    torch.testing.assert_close(x_hat, expected, rtol=0, atol=1e-12)
    assert float((x_hat - x).abs().max()) == pytest.approx(0.125 * modulus)  # delta B


def test_stochastic_rounding_is_unbiased_and_nearest_is_deterministic() -> None:
    gen = _gen(7)
    x_local = torch.randn(64, dtype=F64, generator=gen)
    x = x_local + 0.2 * (2 * torch.rand(64, dtype=F64, generator=gen) - 1)
    draws = torch.stack(
        [
            moniqua_decode(moniqua_encode(x, 0.25, 2, "stochastic", gen), x_local)
            for _ in range(4000)
        ]
    )
    step = 2.0**-2 * moniqua_modulus(0.25, 2, "stochastic")  # s B: std <= step / 2
    assert float((draws.mean(0) - x).abs().max()) < 5 * (step / 2) / math.sqrt(4000)
    assert float(draws.std(0).max()) > 0.1 * step
    a = moniqua_encode(x, 0.25, 2, "nearest")
    b = moniqua_encode(x, 0.25, 2, "nearest")
    assert torch.equal(a.payload, b.payload)


def test_moniqua_message_is_really_packed() -> None:
    x = torch.randn(1000)
    two = moniqua_encode(x, 1.0, 2, "stochastic")
    assert two.payload.dtype == torch.uint8 and two.payload.numel() == 250
    assert two.nbytes == 250 + 1 + MoniquaMessage.HEADER_BYTES  # one block: one scale byte
    assert MoniquaMessage.HEADER_BYTES <= 16
    blocks = moniqua_encode(x, torch.full((8,), 1.0), 2, "stochastic", block=128)
    assert blocks.scale_codes.dtype == torch.uint8 and blocks.scale_codes.numel() == 8
    assert blocks.nbytes == 250 + 8 + MoniquaMessage.HEADER_BYTES
    assert moniqua_encode(torch.randn(1001), 1.0, 1, "nearest").payload.numel() == 126
    assert moniqua_encode(x, 1.0, 8, "nearest").payload.numel() == 1000
    assert dense_encode(x).nbytes == 4000
    assert two.nbytes < dense_encode(x).nbytes / 15


def test_moniqua_message_pickles_and_keeps_shape_and_dtype() -> None:
    x_local = torch.randn(3, 5)
    x = x_local + 0.01
    msg = moniqua_encode(x, 0.05, 4, "nearest")
    clone = pickle.loads(pickle.dumps(msg))
    assert isinstance(clone, MoniquaMessage) and clone.count == 15
    out = clone.decode(x_local)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, moniqua_decode(msg, x_local))
    with pytest.raises(ValueError, match="15 values"):
        moniqua_decode(msg, torch.zeros(14))


def test_decodes_agree_across_receivers_within_the_bound() -> None:
    # Any receiver within theta recovers the same value: the mean-preservation of the
    # Moniqua update relies on it.
    gen = _gen(11)
    x = torch.randn(200, dtype=F64, generator=gen)
    msg = moniqua_encode(x, 0.1, 2, "stochastic", gen)
    a = moniqua_decode(msg, x + 0.09)
    b = moniqua_decode(msg, x - 0.05 * torch.rand(200, dtype=F64, generator=gen))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --------------------------------------------------------------- theta and wraps


def test_moniqua_theta() -> None:
    assert moniqua_theta(0.3) == pytest.approx(0.6)
    assert moniqua_theta(0.3, margin=1.5) == pytest.approx(0.45)
    assert moniqua_theta(0.0) == 1e-8
    assert moniqua_theta(0.0, floor=1e-3) == 1e-3
    with pytest.raises(ValueError, match="margin"):
        moniqua_theta(0.3, margin=0.5)
    with pytest.raises(ValueError, match="max_abs_diff"):
        moniqua_theta(float("nan"))


def test_violating_the_bound_wraps_and_is_detected() -> None:
    gen = _gen(5)
    theta, bits, rounding = 0.1, 4, "nearest"
    x_local = torch.randn(100, dtype=F64, generator=gen)
    neighbour = x_local + 0.05 * torch.randn(100, dtype=F64, generator=gen).clamp(-1, 1)
    first = moniqua_decode(moniqua_encode(neighbour, theta, bits, rounding), x_local)
    assert not wrapped(first, None, theta, bits=bits, rounding=rounding)

    # Healthy next step: the neighbour moved a little.
    moved = neighbour + 0.01
    second = moniqua_decode(moniqua_encode(moved, theta, bits, rounding), x_local)
    modulus = float(moniqua_encode(moved, theta, bits, rounding).modulus[0])
    assert float((second - moved).abs().max()) <= moniqua_delta(bits, rounding) * modulus
    assert not wrapped(second, first, theta, bits=bits, rounding=rounding)

    # Bound badly violated on some coordinates: those decode a multiple of B away.
    jumped = moved.clone()
    jumped[:30] += 5 * torch.randn(30, dtype=F64, generator=gen)
    third = moniqua_decode(moniqua_encode(jumped, theta, bits, rounding), x_local)
    turns = (third - jumped)[:30] / modulus  # whole turns of B, up to the rounding error
    assert float((turns - turns.round()).abs().max()) <= moniqua_delta(bits, rounding) + 1e-9
    assert int((turns.round() != 0).sum()) >= 25
    torch.testing.assert_close(third[30:], second[30:])
    assert wrapped(third, second, theta, bits=bits, rounding=rounding)


def test_wrapped_rule_thresholds() -> None:
    prev = torch.zeros(4)
    theta = 1.0
    assert not wrapped(prev + 0.99, prev, theta)  # bits=None: limit theta
    assert wrapped(prev + 1.01, prev, theta)
    # 2-bit stochastic: limit B/2 = 2 theta.
    assert not wrapped(prev + 1.99, prev, theta, bits=2, rounding="stochastic")
    assert wrapped(prev + 2.01, prev, theta, bits=2, rounding="stochastic")
    assert wrapped(torch.tensor([0.0, float("nan")]), None, theta)
    assert not wrapped(prev + 100.0, None, theta)


# ------------------------------------------------ simulated D-PSGD vs Moniqua


def _quadratic(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f_i(x) = 1/2 sum_c a_ic (x_c - c_ic)^2 with different curvatures per node, so that
    no-communication (each node at its own optimum) averages to the wrong point."""
    gen = _gen(seed)
    a = 0.5 + 1.5 * torch.rand(n, d, dtype=F64, generator=gen)
    c = 2.0 * torch.randn(n, d, dtype=F64, generator=gen)
    return a, c, (a * c).sum(0) / a.sum(0)


def _simulate(
    compressor: str,
    *,
    bits: int = 2,
    rounding: str = "stochastic",
    gamma: float = 1.0,
    theta: float | None = None,
    margin: float = 2.0,
    steps: int = 400,
    seed: int = 0,
) -> tuple[float, int]:
    """Run 8 nodes on a ring; return (max error of the averaged model, wrap alarms).

    compressor: ``fp`` (plain D-PSGD), ``moniqua``, or ``silent`` (no communication).
    theta None: tracked as moniqua_theta(max neighbour distance) every step.
    """
    n, d = 8, 16
    a, c, optimum = _quadratic(n, d, seed)
    w = mixing_matrix(range(n), "ring")
    nbrs = [[j for j in range(n) if j != i and w[i, j] > 0] for i in range(n)]
    x = torch.zeros(n, d, dtype=F64)
    # Moniqua as it runs on the workers (strategies.consensus): encode, then mix.
    method = Moniqua(_options("moniqua", bits=bits, rounding=rounding, gamma=gamma))
    states = [method.init(x[i]) for i in range(n)]
    alarms = 0
    for step in range(steps):
        lr = 0.2 / (1 + step / 50)
        grad = a * (x - c)
        if compressor == "fp":
            x = w @ x - lr * grad
            continue
        if compressor == "silent":
            x = x - lr * grad
            continue
        spread = max(float((x[i] - x[j]).abs().max()) for i in range(n) for j in nbrs[i])
        th = theta if theta is not None else moniqua_theta(spread, margin)
        msgs = {}
        for i in range(n):
            msgs[i], states[i] = method.encode(x[i], lr * grad[i], th, seed, step, i, states[i])
        rows = []
        for i in range(n):
            row = _row(w, i)
            new, states[i], stats = method.mix(x[i], lr * grad[i], {j: msgs[j] for j in row},
                                               row, i, states[i])
            alarms += stats["wraps"]
            rows.append(new)
        x = torch.stack(rows)
    return float((x.mean(0) - optimum).abs().max()), alarms


def test_dithered_moniqua_converges_close_to_dpsgd_at_two_and_one_bits() -> None:
    exact, _ = _simulate("fp")
    assert exact < 0.03
    for seed in (0, 1):
        silent, _ = _simulate("silent", seed=seed)
        assert silent > 0.3  # the problem needs communication
        two, alarms = _simulate("moniqua", rounding="dither", gamma=0.3, seed=seed)
        assert two < 0.15 and two < 0.4 * silent and alarms == 0, (seed, two)
        one, _ = _simulate("moniqua", bits=1, rounding="dither", gamma=0.2, margin=1.5,
                           seed=seed)
        assert one < 0.2 and one < 0.5 * silent, (seed, one)


def test_moniqua_with_a_tiny_theta_fails_and_wrap_detection_fires() -> None:
    silent, _ = _simulate("silent")
    for rounding in ("nearest", "dither"):  # 4 and 2 bits: healthy runs raise no alarm
        for bits in (4, 2):
            if (bits, rounding) == (2, "nearest"):
                continue  # stalls (see the failure modes below)
            err, alarms = _simulate("moniqua", bits=bits, rounding=rounding, gamma=0.3)
            assert err < 0.15 and alarms == 0, (bits, rounding, err, alarms)
            # A tiny theta wraps constantly: no better than not communicating at all.
            err, alarms = _simulate("moniqua", bits=bits, rounding=rounding, gamma=0.3,
                                    theta=1e-3)
            assert err > 0.8 * silent and alarms > 500, (bits, rounding, err, alarms)


def test_shared_dither_rounds_close_models_alike() -> None:
    # x_hat_j - x_hat_i is what the update uses. With the shared dither it is unbiased and
    # its spread shrinks with |x_j - x_i|; independent stochastic rounding adds noise of the
    # size of the grid step s B whatever the distance.
    gen = _gen(8)
    d, theta, gap = 400, 1.0, 0.05
    x_i = torch.randn(d, dtype=F64, generator=gen)
    x_j = x_i + gap
    diffs = {"dither": [], "stochastic": []}
    for seed in range(300):
        dither = shared_dither(d, seed)
        for rounding in diffs:
            a = moniqua_encode(x_i, theta, 2, rounding, gen, dither=dither)
            b = moniqua_encode(x_j, theta, 2, rounding, gen, dither=dither)
            diffs[rounding].append(moniqua_decode(b, x_i, dither if rounding == "dither"
                                                  else None)
                                   - moniqua_decode(a, x_i, dither if rounding == "dither"
                                                    else None))
    dith, stoch = torch.stack(diffs["dither"]), torch.stack(diffs["stochastic"])
    assert abs(float(dith.mean()) - gap) < 0.01 and abs(float(stoch.mean()) - gap) < 0.02
    assert float(dith.std()) < 0.5 * float(stoch.std())
    assert shared_dither(5, 1).tolist() == shared_dither(5, 1).tolist()
    assert bool((shared_dither(1000, 2).abs() <= 0.5).all())
    with pytest.raises(ValueError, match="dither"):
        moniqua_encode(x_i, theta, 2, "dither")


def test_blocks_get_their_own_grid() -> None:
    # Block 0 spreads 100x wider than block 1: one theta for both would quantize block 1
    # on block 0's coarse grid.
    gen = _gen(12)
    x_local = torch.randn(256, dtype=F64, generator=gen)
    offsets = torch.cat([torch.rand(128, dtype=F64, generator=gen) - 0.5,
                         0.01 * (torch.rand(128, dtype=F64, generator=gen) - 0.5)])
    x = x_local + offsets
    dither = shared_dither(256, 0)
    one = moniqua_encode(x, 0.5, 2, "dither", dither=dither)
    two = moniqua_encode(x, torch.tensor([0.5, 0.005]), 2, "dither", block=128, dither=dither)
    err_one = (moniqua_decode(one, x_local, dither) - x).abs()
    err_two = (moniqua_decode(two, x_local, dither) - x).abs()
    assert bool((err_two <= moniqua_delta(2, "dither") * two.modulus + 1e-12).all())
    assert float(err_two[128:].max()) < 0.02 * float(err_one[128:].max())
    with pytest.raises(ValueError, match="3 thetas for 2 blocks"):
        moniqua_encode(x, torch.ones(3), 2, "dither", block=128, dither=dither)


def test_two_bit_moniqua_failure_modes_on_a_ring() -> None:
    # theta tracks the spread, and the quantization noise (delta B = theta) is then too
    # large for the ring's spectral gap (0.195) when the full step gamma = 1 is taken.
    err, _ = _simulate("moniqua", gamma=1.0, steps=150)
    assert not err < 10.0
    # Nearest rounding: neighbour differences below the grid step s B round to zero, so
    # on this noiseless problem gossip stalls and the result equals no communication.
    silent, _ = _simulate("silent")
    err, _ = _simulate("moniqua", rounding="nearest", gamma=0.3)
    assert err == pytest.approx(silent, rel=0.01)


# ------------------------------------------------------------------------- CHOCO


def test_sign_compress_values_and_size() -> None:
    v = torch.tensor([1.0, -3.0, 0.0, 2.0, -2.0])
    msg = sign_compress(v)
    assert isinstance(msg, SignMessage)
    assert msg.scale == pytest.approx(8.0 / 5)
    torch.testing.assert_close(msg.decompress(), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0]) * 1.6)
    big = sign_compress(torch.randn(1000))
    assert big.payload.numel() == 125 and big.nbytes == 125 + SignMessage.HEADER_BYTES
    assert sign_compress(torch.zeros(9)).decompress().abs().max() == 0


def test_qsgd_is_unbiased() -> None:
    gen = _gen(2)
    v = torch.randn(32, generator=gen)
    v[3] = 0.0
    draws = torch.stack([qsgd_compress(v, 4, gen).decompress() for _ in range(6000)])
    scale = float(v.norm()) / 4
    assert float((draws.mean(0) - v).abs().max()) < 5 * (scale / 2) / math.sqrt(6000)
    assert float(draws.std(0).max()) > 0.1 * scale  # really random
    assert float(draws[:, 3].abs().max()) == 0.0


def test_qsgd_levels_signs_and_sizes() -> None:
    gen = _gen(4)
    v = torch.randn(1000, generator=gen)
    msg = qsgd_compress(v, 3, gen)
    assert isinstance(msg, QSGDMessage) and msg.bits == 2
    assert msg.signs.numel() == 125 and msg.level_codes.numel() == 250
    assert msg.nbytes == 125 + 250 + QSGDMessage.HEADER_BYTES
    out = msg.decompress()
    levels = out.abs() / (msg.scale / 3)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert bool((out * v >= 0).all())
    assert qsgd_compress(v, 15, gen).bits == 4 and qsgd_compress(v, 16, gen).bits == 8
    assert qsgd_compress(v, 1, gen).level_codes.numel() == 125
    rescaled = qsgd_compress(v, 3, gen, rescale=True)
    assert rescaled.scale == pytest.approx(float(v.norm()) / qsgd_tau(1000, 3), rel=1e-6)
    assert qsgd_compress(torch.zeros(5), 4, gen).decompress().abs().max() == 0
    with pytest.raises(ValueError, match="levels"):
        qsgd_compress(v, 256, gen)


def test_choco_mix_formula() -> None:
    # The public copies after this round's x^_j += Q_j: own, then the two neighbours (fp32
    # messages added to empty copies); step_vec = 0, so x_half = x.
    x_half = torch.tensor([1.0, 2.0])
    own = torch.tensor([0.5, 0.5])
    nbrs = [torch.tensor([1.5, 0.5]), torch.tensor([0.5, 2.5])]
    choco = Choco(_options("choco", gamma=0.4))
    messages = {0: dense_encode(own), 1: dense_encode(nbrs[0]), 2: dense_encode(nbrs[1])}
    weights = {0: 0.25, 1: 0.25, 2: 0.5}
    out, _, _ = choco.mix(x_half, torch.zeros(2), messages, weights, 0, choco.init(x_half))
    torch.testing.assert_close(out, x_half + 0.4 * torch.tensor([0.25, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        choco.mix(x_half, torch.zeros(2), messages, {0: 0.5, 1: 0.5}, 0, choco.init(x_half))


@pytest.mark.parametrize("kind", ["sign", "qsgd"])
def test_choco_gossip_reaches_consensus_and_preserves_the_mean(kind: str) -> None:
    n, d = 8, 50
    gen = _gen(0)
    w = mixing_matrix(range(n), "ring")
    x = torch.randn(n, d, generator=gen)
    mean, start = x.mean(0), (x - x.mean(0)).norm()
    choco = Choco(_options("choco", gamma=0.2, choco_compressor=kind))
    states = [choco.init(x[i]) for i in range(n)]
    still = torch.zeros(d)  # pure consensus: no local step
    for step in range(200):
        msgs = {}
        for i in range(n):
            msgs[i], states[i] = choco.encode(x[i], still, 0.0, 0, step, i, states[i])
        rows = []
        for i in range(n):
            row = _row(w, i)
            new, states[i], _ = choco.mix(x[i], still, {j: msgs[j] for j in row}, row, i,
                                          states[i])
            rows.append(new)
        x = torch.stack(rows)
    assert (x - mean).norm() < 1e-2 * start
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=1e-5)


def test_messages_pickle() -> None:
    v = torch.randn(33)
    for msg in (sign_compress(v), qsgd_compress(v, 4), dense_encode(v)):
        clone = pickle.loads(pickle.dumps(msg))
        assert type(clone) is type(msg) and clone.nbytes == msg.nbytes
        torch.testing.assert_close(clone.decompress(), msg.decompress())


# ---------------------------------------------------------------------- registry


def _encode(name: str, x: torch.Tensor) -> object:
    """One message of the consensus method registered as ``name`` (2 bits, nearest)."""
    method = COMPRESSORS.get(name).build(_options(name, bits=2, rounding="nearest"))
    message, _ = method.encode(x, torch.zeros_like(x), 1.0, 0, 1, 0, method.init(x))
    return message


def test_registry_and_errors() -> None:
    assert COMPRESSORS.names() == ["none", "moniqua", "choco"]
    assert isinstance(_encode("none", torch.ones(3)), DenseMessage)
    assert isinstance(_encode("moniqua", torch.ones(3)), MoniquaMessage)
    assert isinstance(_encode("choco", torch.ones(3)), SignMessage)
    with pytest.raises(KeyError, match="unknown compressor 'zip'; valid: none, moniqua, choco"):
        build_method(_options("zip"))
    with pytest.raises(KeyError, match="valid: sign, qsgd"):
        choco_compress(torch.ones(3), "topk")
