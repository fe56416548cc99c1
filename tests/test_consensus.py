"""The consensus methods and Moniqua's theta controller (strategies/consensus.py) against the
papers' updates written out here on small tensors; their state is explicit and returned."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from strategies.compression import (
    DenseMessage,
    MoniquaMessage,
    SignMessage,
    block_max,
    block_moduli,
    bound_codes,
    code_bounds,
    code_thetas,
    moniqua_decode,
    moniqua_delta,
    moniqua_encode,
    qsgd_compress,
    shared_dither,
)
from strategies.consensus import (
    DPSGD,
    SETTLE_ROUNDS,
    Choco,
    ChocoState,
    Moniqua,
    MoniquaState,
    ThetaController,
    ThetaState,
    build_method,
    control_message,
    control_nbytes,
    mixing_gap,
    read_control,
    theta_breached,
    theta_message,
)
from strategies.registry import COMPRESSORS
from strategies.topology import mixing_matrix, spectral_gap

F64 = torch.float64
SEED = 7


def options(compress: str, **kw) -> SimpleNamespace:
    base = dict(compress=compress, bits=8, rounding="dither", block_size=4, gamma=0.5,
                theta_margin=1.2, choco_compressor="sign")
    return SimpleNamespace(**{**base, **kw})


def replicas(n: int = 3, d: int = 8, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """n close models (rows) and their local steps lr g_i."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(d, generator=gen)
    x = centre + spread * (2 * torch.rand(n, d, generator=gen) - 1)
    return x, 0.01 * torch.randn(n, d, generator=gen)


def row(w: torch.Tensor, i: int) -> dict[int, float]:
    return {j: float(w[i, j]) for j in range(w.shape[0]) if w[i, j] != 0}


def one_round(method, x, steps, w, states, *, step=1, theta=0.2, drop=()):
    """Every worker encodes, then mixes what arrived (messages of `drop` are lost)."""
    n = x.shape[0]
    msgs = {}
    for i in range(n):
        msgs[i], states[i] = method.encode(x[i], steps[i], theta, SEED, step, i, states[i])
    out, stats = [], []
    for i in range(n):
        weights = row(w, i)
        arrived = {j: msgs[j] for j in weights if j == i or j not in drop}
        new, states[i], s = method.mix(x[i], steps[i], arrived, weights, i, states[i])
        out.append(new)
        stats.append(s)
    return torch.stack(out), msgs, stats


# ------------------------------------------------------------------- the updates


def test_dpsgd_is_the_weighted_average_minus_the_local_step() -> None:
    x, steps = replicas(4)
    w = mixing_matrix(range(4), "ring")
    method = DPSGD(options("none"))
    states = [method.init(x[i]) for i in range(4)]
    new, msgs, stats = one_round(method, x, steps, w, states)
    assert all(isinstance(m, DenseMessage) for m in msgs.values())
    torch.testing.assert_close(new, w.float() @ x - steps, rtol=0, atol=1e-6)
    for i, s in enumerate(stats):
        assert s["wraps"] == 0
        np.testing.assert_allclose(s["max_diff"], [max(float((x[j] - x[i]).abs().max())
                                                       for j in row(w, i))], rtol=1e-6)
        np.testing.assert_array_equal(s["max_step"], block_max(steps[i], 4).numpy())


def test_a_missing_message_keeps_its_weight_at_home() -> None:
    x, steps = replicas(4)
    w = mixing_matrix(range(4), "ring")
    method = DPSGD(options("none"))
    new, _, _ = one_round(method, x, steps, w, [method.init(r) for r in x], drop={1})
    home = w.clone()
    for i in (0, 2):  # rank 1's neighbours
        home[i, i] += home[i, 1]
        home[i, 1] = 0
    torch.testing.assert_close(new, home.float() @ x - steps, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="own message"):
        method.mix(x[0], steps[0], {1: DenseMessage(x[1])}, row(w, 0), 0, method.init(x[0]))


@pytest.mark.parametrize("bits, rounding", [(8, "dither"), (4, "nearest"), (2, "stochastic")])
def test_moniqua_is_the_papers_update(bits: int, rounding: str) -> None:
    x, steps = replicas(3, spread=0.05)
    x = x.to(F64)
    steps = steps.to(F64)
    w = mixing_matrix(range(3), "ring")
    gamma, theta = 0.5, np.full(2, 0.2)  # one theta per block of 4
    method = Moniqua(options("moniqua", bits=bits, rounding=rounding, gamma=gamma))
    states = [method.init(x[i]) for i in range(3)]
    new, msgs, stats = one_round(method, x, steps, w, states, step=5, theta=theta)
    dither = shared_dither(8, SEED * 1_000_003 + 5) if rounding == "dither" else None
    for i in range(3):
        gen = torch.Generator().manual_seed(SEED * 1_000_003 + 5 * 1009 + i)
        sent = moniqua_encode(x[i], torch.from_numpy(theta), bits, rounding, gen, block=4,
                              dither=dither)
        assert isinstance(msgs[i], MoniquaMessage) and torch.equal(msgs[i].payload, sent.payload)
        hat = {j: moniqua_decode(msgs[j], x[i], dither) for j in range(3)}  # x^_j seen by i
        expected = x[i] + gamma * sum(w[i, j] * (hat[j] - hat[i]) for j in range(3)) - steps[i]
        torch.testing.assert_close(new[i], expected, rtol=0, atol=1e-12)
        # ... which is D-PSGD's mixing step up to the quantization error delta B.
        exact = x[i] + gamma * sum(w[i, j] * (x[j] - x[i]) for j in range(3)) - steps[i]
        error = 2 * gamma * moniqua_delta(bits, rounding) * float(msgs[i].modulus.max())
        assert float((new[i] - exact).abs().max()) <= error
        assert stats[i]["wraps"] == 0 and stats[i]["max_diff"].shape == (2,)
        spread = torch.stack([block_max(hat[j] - x[i], 4) for j in range(3) if j != i])
        np.testing.assert_allclose(stats[i]["max_diff"], spread.amax(0).float().numpy())
    assert set(states[0].last_decoded) == {1, 2}


def test_moniqua_wraps_are_counted_and_left_out() -> None:
    x, steps = replicas(3, spread=0.5)
    w = mixing_matrix(range(3), "ring")
    method = Moniqua(options("moniqua", bits=8, rounding="nearest"))
    states = [method.init(r) for r in x]
    one_round(method, x, steps, w, states, theta=1.0)  # theta covers the spread: no wrap
    moved = x.clone()
    moved[1] += 3.0  # rank 1 jumps by far more than the bound: its decodes wrap
    new, _, stats = one_round(method, moved, steps, w, states, step=2, theta=1.0)
    # Ranks 0 and 2 see rank 1 jump; rank 1, decoding against its own moved model, sees both.
    assert [s["wraps"] for s in stats] == [1, 2, 1]
    # Rank 0 mixed with rank 2 only; rank 1's weight was not used at all.
    hat2 = moniqua_decode(moniqua_encode(moved[2], 1.0, 8, "nearest", block=4), moved[0])
    own = moniqua_decode(moniqua_encode(moved[0], 1.0, 8, "nearest", block=4), moved[0])
    torch.testing.assert_close(new[0], moved[0] + 0.5 * w[0, 2].float() * (hat2 - own)
                               - steps[0], rtol=0, atol=1e-6)


def test_choco_is_the_papers_update_over_two_rounds() -> None:
    x, steps = replicas(4)
    w = mixing_matrix(range(4), "ring")
    gamma = 0.3
    method = Choco(options("choco", gamma=gamma, choco_compressor="qsgd"))
    states = [method.init(r) for r in x]
    public = torch.zeros(4, 8)  # x^_j: the copies every holder keeps in step
    for step in (1, 2):
        new, msgs, stats = one_round(method, x, steps, w, states, step=step)
        for j in range(4):
            # Q(x_half - x^_self), drawn from the worker's generator of the round
            gen = torch.Generator().manual_seed(SEED * 1_000_003 + step * 1009 + j)
            sent = qsgd_compress(x[j] - steps[j] - public[j], 16, gen, rescale=True)
            torch.testing.assert_close(msgs[j].decompress(), sent.decompress())
        public = public + torch.stack([msgs[j].decompress() for j in range(4)])
        expected = torch.stack([
            x[i] - steps[i] + gamma * sum(w[i, j].float() * (public[j] - public[i])
                                          for j in range(4) if j != i)
            for i in range(4)])
        torch.testing.assert_close(new, expected, rtol=0, atol=1e-6)
        for i in range(4):
            torch.testing.assert_close(states[i].public[i], public[i])
            assert set(states[i].public) == set(row(w, i))
        x = new


# ------------------------------------------------------------- explicit state


@pytest.mark.parametrize("compress", ["none", "moniqua", "choco"])
def test_state_is_returned_not_kept(compress: str) -> None:
    x, steps = replicas(3)
    w = mixing_matrix(range(3), "ring")
    method = build_method(options(compress, rounding="stochastic"))
    states = [method.init(r) for r in x]
    one_round(method, x, steps, w, states)  # a round of history (copies, last decodes)
    msgs = {}
    for i in range(3):
        msgs[i], states[i] = method.encode(x[i], steps[i], 0.2, SEED, 2, i, states[i])
    again, _ = method.encode(x[0], steps[0], 0.2, SEED, 2, 0, states[0])
    assert type(again) is type(msgs[0]) and again.nbytes == msgs[0].nbytes
    before = states[0]
    held = getattr(before, "public", None) or getattr(before, "last_decoded", None) or {}
    snapshot = {k: v.clone() for k, v in held.items()}
    assert len(snapshot) == (0 if compress == "none" else 3 if compress == "choco" else 2)
    first = method.mix(x[0], steps[0], msgs, row(w, 0), 0, before)
    second = method.mix(x[0], steps[0], msgs, row(w, 0), 0, before)
    assert torch.equal(first[0], second[0])
    for key in ("wraps", "max_diff", "max_step"):
        np.testing.assert_array_equal(first[2][key], second[2][key])
    assert states[0] is before
    for k, v in snapshot.items():  # the input copies and last decodes are untouched
        assert torch.equal(held[k], v)
    assert len(held) == len(snapshot)
    reset = method.reset(first[1])
    assert not getattr(reset, "public", {}) and not getattr(reset, "last_decoded", {})


def test_encode_draws_depend_on_seed_step_and_rank_only() -> None:
    x, steps = replicas(1, d=64)
    method = Moniqua(options("moniqua", bits=2, rounding="stochastic", block_size=0))
    state = method.init(x[0])
    a, _ = method.encode(x[0], steps[0], 1.0, SEED, 3, 1, state)
    b, _ = method.encode(x[0], steps[0], 1.0, SEED, 3, 1, state)
    c, _ = method.encode(x[0], steps[0], 1.0, SEED, 3, 2, state)
    assert torch.equal(a.payload, b.payload) and not torch.equal(a.payload, c.payload)
    dithered = Moniqua(options("moniqua", bits=2, rounding="dither"))
    _, s1 = dithered.encode(x[0], steps[0], 1.0, SEED, 3, 1, dithered.init(x[0]))
    _, s2 = dithered.encode(x[0], steps[0], 1.0, SEED, 3, 2, dithered.init(x[0]))
    assert torch.equal(s1.dither, s2.dither)  # the round's dither is shared
    assert torch.equal(s1.dither, shared_dither(64, SEED * 1_000_003 + 3))
    assert isinstance(s1, MoniquaState) and isinstance(Choco(options("choco")).init(x[0]),
                                                        ChocoState)


def test_registry_entries() -> None:
    assert COMPRESSORS.names() == ["none", "moniqua", "choco"]
    assert all(e.description for e in COMPRESSORS.entries())
    x = torch.ones(3)
    sign = build_method(options("choco")).encode(x, torch.zeros(3), 0.0, 0, 1, 0,
                                                 ChocoState())[0]
    assert isinstance(sign, SignMessage)


# ------------------------------------------------------------- theta controller


def stats_row(max_diff, max_step, wraps=0) -> dict:
    return {"wraps": wraps, "max_diff": np.array(max_diff, dtype=np.float32),
            "max_step": np.array(max_step, dtype=np.float32)}


def test_theta_is_at_least_margin_times_the_spread_seen() -> None:
    ctl = ThetaController(margin=1.5, block_size=4)
    state = ctl.init()
    assert isinstance(state, ThetaState) and state.cap == 2.0
    # (b) the spread seen plus two steps is below (a) cap max|step| / gap: theta follows (b).
    rows = [stats_row([0.01, 0.02], [0.1, 0.1]), stats_row([0.03, 0.01], [0.1, 0.2])]
    theta, state, resync = ctl.update(state, rows, [0, 1, 2, 3], "ring", 1)
    assert not resync and theta.shape == (2,)
    spread = np.array([0.03 + 2 * 0.1, 0.01 + 2 * 0.2])  # per block, the largest of the rows
    np.testing.assert_allclose(theta, 1.5 * spread, rtol=1e-6)
    assert np.all(theta >= 1.5 * np.array([0.03, 0.02]))
    # (a) binds when the neighbours look far apart: cap x largest recent step / gap.
    far = [stats_row([50.0, 50.0], [0.1, 0.2])]
    theta, state, _ = ctl.update(state, far, [0, 1, 2, 3], "ring", 2)
    limit = 2.0 * np.array([0.1, 0.2]) / mixing_gap((0, 1, 2, 3), "ring")
    np.testing.assert_allclose(theta, 1.5 * limit, rtol=1e-6)
    assert len(state.recent_steps) == 2


def test_a_wrap_doubles_the_cap_and_asks_for_a_resync() -> None:
    ctl = ThetaController(margin=1.2, block_size=4)
    state = ctl.init()
    _, state, _ = ctl.update(state, [stats_row([0.1, 0.1], [0.01, 0.02])], [0, 1], "ring", 1)
    before = state.theta
    theta, state, resync = ctl.update(state, [stats_row([0.1, 0.1], [0.01, 0.02], wraps=2)],
                                      [0, 1], "ring", 2)
    assert resync and state.cap == 4.0 and theta is before
    models = {0: np.zeros(8, dtype=np.float32), 1: np.arange(8, dtype=np.float32) / 10}
    state = ctl.resync(state, models, 2)
    spread = np.array([0.3, 0.7], dtype=np.float32) + 2 * np.array([0.01, 0.02],
                                                                    dtype=np.float32)
    np.testing.assert_allclose(state.theta, 1.2 * spread, rtol=1e-6)
    np.testing.assert_allclose(state.held, state.theta / 1.2)
    assert state.resynced_at == 2 and state.cap == 4.0
    # Nothing to measure without a local step seen, or without replicas.
    assert not ctl.can_resync(ctl.init()) and ctl.resync(ctl.init(), models, 3) == ctl.init()
    assert ctl.resync(state, {}, 3) is state


def test_theta_may_hold_the_measured_spread_while_the_replicas_settle() -> None:
    ctl = ThetaController(margin=1.0, block_size=0)
    state = ctl.init()
    small = stats_row([0.001], [0.001])
    _, state, _ = ctl.update(state, [small], [0, 1, 2, 3], "complete", 1)
    state = ctl.resync(state, [np.zeros(4, np.float32), np.full(4, 5.0, np.float32)], 1)
    held = float(state.held[0])
    wide = stats_row([10.0], [0.001])  # (b) says 10, (a) says about 0.002
    for step in range(2, 1 + SETTLE_ROUNDS + 1):
        theta, state, _ = ctl.update(state, [wide], [0, 1, 2, 3], "complete", step)
        assert float(theta[0]) == pytest.approx(held)  # held up to the measured spread
    theta, state, _ = ctl.update(state, [wide], [0, 1, 2, 3], "complete", SETTLE_ROUNDS + 2)
    assert float(theta[0]) == pytest.approx(2.0 * 0.001, rel=1e-5)  # back to bound (a)


def test_theta_state_round_trips_as_tensors_and_numbers() -> None:
    ctl = ThetaController(margin=1.2, block_size=4)
    state = ctl.init()
    for step in range(1, 25):
        _, state, _ = ctl.update(state, [stats_row([0.1, 0.2], [0.01 * step, 0.02])],
                                 [0, 1, 2], "ring", step)
    assert len(state.recent_steps) == 20
    saved = ctl.state_dict(state)
    assert {type(v) for v in saved.values()} <= {torch.Tensor, float, int}
    back = ctl.load_state_dict(saved)
    np.testing.assert_array_equal(back.theta, state.theta)
    np.testing.assert_array_equal(np.array(back.recent_steps), np.array(state.recent_steps))
    assert (back.cap, back.resynced_at) == (state.cap, state.resynced_at)
    legacy = ctl.load_state_dict({k: saved[k] for k in ("theta", "cap", "recent_steps")})
    assert legacy.resynced_at == -SETTLE_ROUNDS
    empty = ctl.load_state_dict(ctl.state_dict(ctl.init()))
    assert empty.recent_steps == () and not ctl.can_resync(empty)


def test_mixing_gap() -> None:
    ring = mixing_gap((0, 1, 2, 3, 4, 5), "ring")
    assert ring == pytest.approx(spectral_gap(mixing_matrix(range(6), "ring")))
    assert mixing_gap((3,), "ring") == 1.0
    # One-peer exponential over 8: three rounds average exactly, so each round closes it all.
    assert mixing_gap(tuple(range(8)), "one_peer_exp") == pytest.approx(1.0)
    assert 0 < mixing_gap(tuple(range(6)), "one_peer_exp") < 1
    assert math.isclose(mixing_gap((0, 1), "complete"), 1.0)


# -------------------------------------------------------------- control traffic

QUARTER_OCTAVE = 2.0**0.25 * (1 + 1e-15)  # a code's step, and a few ulps of pow's rounding


@pytest.mark.parametrize("bits, rounding", [(1, "dither"), (2, "dither"), (2, "nearest"),
                                            (2, "stochastic"), (4, "nearest"), (8, "dither")])
def test_theta_sent_as_its_code_keeps_the_recovery_bound(bits: int, rounding: str) -> None:
    """theta travels as the 1-byte code of its B: the theta it stands for is >= the exact one
    (at most 2^(1/4) larger), and any spread within that decoded theta still decodes within
    delta B (compression.py: theta' + delta B <= B / 2)."""
    gen = torch.Generator().manual_seed(bits)
    block, n_blocks = 16, 12
    d = block * n_blocks - 5  # a short last block
    theta = np.exp(np.random.default_rng(bits).uniform(np.log(1e-7), np.log(1e3), n_blocks))
    codes = theta_message(theta, bits, rounding)
    assert codes.dtype == np.uint8 and codes.nbytes == n_blocks  # 1 byte per block, not 8
    decoded = code_thetas(torch.from_numpy(codes), bits, rounding).numpy()
    assert np.all(decoded >= theta) and np.all(decoded <= theta * QUARTER_OCTAVE)
    method = Moniqua(options("moniqua", bits=bits, rounding=rounding, block_size=block))
    per_value = torch.from_numpy(decoded).repeat_interleave(block)[:d]
    delta = moniqua_delta(bits, rounding)
    for trial in range(20):
        y = 100 * torch.randn(d, dtype=F64, generator=gen) if trial else torch.zeros(d, dtype=F64)
        t = 2 * torch.rand(d, dtype=F64, generator=gen) - 1
        t[: d // 4] = torch.sign(t[: d // 4])  # the spread at the decoded theta itself
        x = y + per_value * t
        assert bool(((x - y).abs() <= per_value * (1 + 1e-12) + 1e-13).all())
        msg, state = method.encode(x, torch.zeros(d, dtype=F64), codes, SEED, trial, 0,
                                   method.init(x))
        assert np.array_equal(msg.scale_codes.numpy(), codes)  # used as they are
        # ... which are the codes the exact theta gives: the message is the same.
        exact, _ = method.encode(x, torch.zeros(d, dtype=F64), theta, SEED, trial, 0,
                                 method.init(x))
        assert torch.equal(msg.payload, exact.payload)
        x_hat = moniqua_decode(msg, y, state.dither)
        bound = delta * block_moduli(msg.scale_codes).repeat_interleave(block)[:d]
        slack = 1e-12 * (1 + float(x.abs().max()))  # float64 rounding, no wrap
        assert bool(((x_hat - x).abs() <= bound + slack).all()), (trial, bits, rounding)
        # The bound is tight at the code: B / 2 = theta' + delta B.
        torch.testing.assert_close(per_value + bound, bound / delta / 2, rtol=1e-15, atol=0)


def test_a_coded_bound_is_an_upper_bound_at_most_a_quarter_octave_looser() -> None:
    grid = block_moduli(torch.arange(0, 255)).numpy()  # the codes' values themselves
    rng = np.random.default_rng(0)
    values = np.concatenate([grid, np.nextafter(grid, np.inf), np.nextafter(grid, 0),
                             np.exp(rng.uniform(np.log(3e-10), np.log(2e9), 5000))])
    values = values[(values >= grid[0]) & (values <= grid[-1])]
    coded = code_bounds(bound_codes(values))
    assert np.all(coded >= values) and np.all(coded <= values * QUARTER_OCTAVE)
    np.testing.assert_array_equal(code_bounds(bound_codes(grid)), grid)  # exact on the grid
    # Outside the grid: still upper bounds; too large or not finite decodes to inf.
    edge = code_bounds(bound_codes(np.array([0.0, 1e-12, 3.5e9, np.inf, np.nan])))
    assert edge[0] == edge[1] == grid[0] and np.all(np.isinf(edge[2:]))
    # The theta a scale code stands for, likewise (1 - 2 delta = 3/4 at 2-bit nearest).
    theta = np.exp(rng.uniform(np.log(1e-8), np.log(1e8), 5000))
    back = code_thetas(torch.from_numpy(theta_message(theta, 2, "nearest")), 2, "nearest")
    assert np.all(back.numpy() >= theta) and np.all(back.numpy() <= theta * QUARTER_OCTAVE)


def test_control_stats_travel_coded_and_only_loosen_theta() -> None:
    """The workers' max_diff and max_step go up as 1-byte codes rounded up: 2 bytes per block
    and a 4-byte wrap count instead of 2 float64s per block; the theta the controller sets from
    them is >= the one from the exact stats and at most 2^(1/4) larger."""
    x, steps = replicas(4, d=10)
    w = mixing_matrix(range(4), "ring")
    method = Moniqua(options("moniqua", bits=4, rounding="dither", block_size=4))
    assert method.control and not DPSGD(options("none")).control
    assert not Choco(options("choco")).control
    states = [method.init(r) for r in x]
    _, _, stats = one_round(method, x, steps, w, states, theta=np.full(3, 0.2))
    sent = [control_message(s) for s in stats]
    assert all(control_nbytes(m) == 2 * 3 + 4 for m in sent)  # 3 blocks of 4 values
    rows = [read_control(m) for m in sent]
    for exact, coded in zip(stats, rows):
        assert coded["wraps"] == exact["wraps"] == 0
        for key in ("max_diff", "max_step"):
            assert np.all(coded[key] >= exact[key])
            assert np.all(coded[key] <= exact[key] * QUARTER_OCTAVE)
    ctl = ThetaController(margin=1.2, block_size=4)
    near = [stats_row([0.01, 0.02, 0.001], [0.1, 0.05, 0.2])]  # here (b) binds, above (a)
    for exact, coded, bound in ((stats, rows, "a"),
                                (near, [read_control(control_message(near[0]))], "b")):
        theta_exact, _, _ = ctl.update(ctl.init(), exact, [0, 1, 2, 3], "ring", 1)
        seen = np.max([s["max_diff"] + 2 * s["max_step"] for s in exact], axis=0)
        assert np.all((theta_exact < 1.2 * seen * 0.99) == (bound == "a"))
        theta_coded, _, _ = ctl.update(ctl.init(), coded, [0, 1, 2, 3], "ring", 1)
        assert np.all(theta_coded >= theta_exact)
        assert np.all(theta_coded <= theta_exact * QUARTER_OCTAVE)
    # A non-finite stat stays non-finite: the controller keeps theta, as with exact stats.
    broken = read_control(control_message({**stats[0], "max_diff": np.full(3, np.nan)}))
    state = ctl.init()
    theta, _, resync = ctl.update(state, [broken], [0, 1], "ring", 1)
    assert theta is state.theta and not resync


def test_a_theta_breach_is_a_neighbour_pair_further_apart_than_the_coded_theta() -> None:
    """theta_breached against its definition: some block of some neighbour pair's difference
    beyond the theta that block's code stands for; pairs that are not neighbours do not
    count. Past that bound Moniqua's decode is off by a whole modulus B; within it, by at most
    its quantization error delta B."""
    theta, bits, rounding = np.array([0.01, 0.04]), 2, "nearest"
    bound = code_thetas(torch.from_numpy(theta_message(theta, bits, rounding)), bits, rounding)
    x0 = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(SEED))
    within = x0.clone()
    within[:4] += 0.99 * bound[0]
    within[4:] -= 0.99 * bound[1]
    beyond = within.clone()
    beyond[6] = x0[6] + 1.5 * bound[1]
    far = x0 + 100.0
    rows = {0: x0.numpy(), 1: within.numpy(), 2: far.numpy(), 3: beyond.numpy()}
    assert not theta_breached(theta, rows, [(0, 1), (1, 0)], bits, rounding, 4)
    assert not theta_breached(theta, rows, [(0, 1), (0, 7)], bits, rounding, 4)  # 7: not live
    assert theta_breached(theta, rows, [(0, 1), (0, 3)], bits, rounding, 4)
    assert theta_breached(theta, rows, [(1, 2)], bits, rounding, 4)

    B = block_moduli(torch.from_numpy(theta_message(theta, bits, rounding)[1:]))  # block 1's

    def decoded(x: torch.Tensor) -> torch.Tensor:
        msg = moniqua_encode(x, bound, bits, rounding, block=4)
        return moniqua_decode(msg, x0)

    assert (decoded(within) - within).abs().max() <= moniqua_delta(bits, rounding) * B.max()
    assert abs(float(decoded(beyond)[6] - beyond[6])) > 0.5 * float(B)
