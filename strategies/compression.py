"""Compressed gossip messages: Moniqua and CHOCO-SGD compressors (pure torch).

Every message is a plain dataclass of tensors and Python scalars (picklable, so it can
travel through an object store) with ``.nbytes``: the real wire size, i.e. the packed
payload plus a small header counted at the sizes named in each class.

Moniqua (Lu & De Sa, ICML 2020). With b bits, s = 2^-b, rounding error at most delta
(delta = s stochastic, s/2 nearest or dither) and B = 2 theta / (1 - 2 delta):

- encode: q = Q((x / B) mod 1) on the levels k*s, k = 0..2^b - 1. Q works modulo 1: a
  value that rounds up to 1.0 is sent as level 0 (same point of the circle).
- decode with the receiver's own model y: x_hat = ((q B - y) cmod B) + y, where cmod is
  the centred modulo into [-B/2, B/2).

Why |x_hat - x| <= delta B when |x - y| <= theta (coordinate-wise): q B = x + e B (mod B)
with |e| <= delta, so q B - y = (x - y) + e B (mod B). Since theta + delta B = B / 2,
(x - y) + e B lies in [-B/2, B/2] and cmod returns it unchanged, giving x_hat = x + e B.
The single point B/2 would wrap to -B/2; it needs |x - y| = theta and e = +delta, which
only nearest rounding can produce, at a tie. Nearest rounding therefore breaks ties
*downwards* (e in [-s/2, s/2)), which makes the guarantee hold on the closed bound.
Encode and decode compute in float64 (float32 would lose log2(|x| / B) bits in the mod-1
step); keep a margin on theta (moniqua_theta).

Two additions to the paper, both measured in benchmarks/gossip.md:
- Blocks: theta (and so B) per block of values instead of one for the whole model, so a few
  large coordinates do not set a coarse grid for all the others; B travels as one byte per
  block (a power of 2^(1/4), rounded up).
- rounding='dither' (subtractive dither): level k = round(u + v), decoded as k - v, where v
  in [-1/2, 1/2) is drawn from a seed every worker shares for the round (never sent). The
  error keeps nearest rounding's bound (delta = s/2, so 1 bit works) but is uniform, zero
  mean and independent of x; and since neighbours share v, two close models are rounded
  alike, so the difference x_hat_j - x_hat_i that the update uses is unbiased with variance
  about s B |x_j - x_i| instead of (s B)^2. Nearest rounding has a dead zone (differences
  below s B vanish) and independent stochastic rounding adds noise of size s B each round;
  with a theta that tracks the measured spread both fed back into theta and kept the
  replicas from agreeing at <= 2 bits.

Update (docs/algorithms.md): x_i <- x_i + gamma sum_j W_ij (x_hat_j - x_hat_i) - lr g_i.

CHOCO-SGD (Koloskova et al. 2019): x_half = x - lr g; q = Q(x_half - x_hat_self);
every holder of a copy does x_hat_j += decompress(q_j); then
x = x_half + gamma sum_j w_ij (x_hat_j - x_hat_self).

The updates themselves, and Moniqua's theta controller, are in strategies/consensus.py; this
module holds the encoders, decoders and their wire formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from strategies.bitpack import VALID_BITS, pack_bits, pack_signs, unpack_bits, unpack_signs

ROUNDINGS = ("dither", "stochastic", "nearest")

# Header sizes on the wire: counts as uint32, bits as uint8, scales as float32 (Moniqua's B:
# one byte per block, see scale_code).
_COUNT_BYTES, _BITS_BYTES, _F32_BYTES = 4, 1, 4


# ---------------------------------------------------------------------------- none


@dataclass
class DenseMessage:
    """Uncompressed fp32 message: 4 bytes per value, no header."""

    values: torch.Tensor  # float32, flattened

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def decompress(self) -> torch.Tensor:
        return self.values


def dense_encode(x: torch.Tensor) -> DenseMessage:
    """The ``none`` compressor: x flattened and cast to float32."""
    return DenseMessage(x.detach().reshape(-1).to(torch.float32).clone())


# ------------------------------------------------------------------------- Moniqua

# B travels as a 1-byte code per block: B = 2^(code / 4 - 32), rounded *up* to the next code
# (at most 19% larger, which only loosens the bound). Codes cover 2.3e-10 .. 3.6e9. The same
# grid carries the driver's theta (code_thetas) and the workers' bounds (bound_codes, where
# the last code means "too large or not finite").
_SCALE_STEPS_PER_OCTAVE, _SCALE_OFFSET, _BOUND_OVERFLOW = 4, 128, 255


@dataclass
class MoniquaMessage:
    """Moniqua message: packed level indices plus a header (count, bits, block size) and one
    byte per block coding that block's modulus B."""

    payload: torch.Tensor  # uint8, ceil(count * bits / 8) bytes
    count: int
    bits: int
    block: int  # values per block; each block has its own B
    scale_codes: torch.Tensor  # uint8, one per block

    HEADER_BYTES = _COUNT_BYTES + _BITS_BYTES + _COUNT_BYTES

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.scale_codes.numel() + self.HEADER_BYTES

    @property
    def modulus(self) -> torch.Tensor:
        """B per value (float64)."""
        return block_moduli(self.scale_codes).repeat_interleave(self.block)[:self.count]

    def decode(self, x_local: torch.Tensor, dither: torch.Tensor | None = None) -> torch.Tensor:
        return moniqua_decode(self, x_local, dither)


def moniqua_delta(bits: int, rounding: str) -> float:
    """Worst-case rounding error delta, in units of B: s for stochastic, s/2 for nearest and
    dither."""
    if bits not in VALID_BITS:
        raise ValueError(f"strategy.bits must be one of {VALID_BITS}, got {bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"strategy.rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if bits == 1 and rounding == "stochastic":
        raise ValueError(
            "strategy.rounding='stochastic' needs at least 2 bits (delta = s = 1/2 leaves "
            "no room for theta); use strategy.rounding='dither' or 'nearest' with 1 bit"
        )
    step = 2.0**-bits
    return step if rounding == "stochastic" else step / 2


def moniqua_modulus(theta: float, bits: int, rounding: str) -> float:
    """B = 2 theta / (1 - 2 delta), rounded up by two ulps.

    The division rounds to nearest; nudging B up makes theta <= B (1 - 2 delta) / 2 hold
    exactly, otherwise |x - y| = theta at a rounding tie can wrap (relative change 4e-16).
    """
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    modulus = 2.0 * theta / (1.0 - 2.0 * moniqua_delta(bits, rounding))
    return math.nextafter(math.nextafter(modulus, math.inf), math.inf)


def scale_codes(thetas: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """Per block, the smallest 1-byte code whose B = 2^(code/4 - 32) is >= 2 theta / (1 - 2
    delta) (uint8)."""
    if not bool(torch.isfinite(thetas).all() and (thetas > 0).all()):
        raise ValueError("theta must be positive and finite in every block")
    need = 2.0 * thetas.to(torch.float64) / (1.0 - 2.0 * moniqua_delta(bits, rounding))
    need = torch.nextafter(need, torch.full_like(need, math.inf))  # the division rounded
    codes = torch.ceil(torch.log2(need) * _SCALE_STEPS_PER_OCTAVE) + _SCALE_OFFSET
    codes += (block_moduli(codes) < need).to(codes.dtype)  # log2 rounding
    # Below the range a larger B only loosens the bound; above it training has diverged and
    # the decodes wrap (wrap detection reports it).
    return codes.clamp_(0, 255).to(torch.uint8)


def block_moduli(codes: torch.Tensor) -> torch.Tensor:
    """B of each block from its 1-byte code (exact powers of 2^(1/4), float64)."""
    exponent = (codes.to(torch.float64) - _SCALE_OFFSET) / _SCALE_STEPS_PER_OCTAVE
    return torch.pow(2.0, exponent)


def code_thetas(codes: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """The theta a block's scale code stands for: the largest bound its B covers,
    B (1 - 2 delta) / 2 rounded down (float64).

    This is how theta travels from the driver to the workers (one byte per block instead of
    a float64): the code of theta's B is rounded up, so the decoded theta is >= the exact one
    (at most 2^(1/4) larger) and the recovery bound holds for any spread within it, since
    theta' + delta B <= B / 2."""
    half = block_moduli(codes) * (1.0 - 2.0 * moniqua_delta(bits, rounding)) / 2
    return torch.nextafter(half, torch.zeros_like(half))


def bound_codes(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Upper bounds as 1-byte codes on B's grid, 2^(code/4 - 32), rounded *up* (uint8 numpy):
    how a worker sends the driver its per-block max_diff and max_step. A decoded code is
    >= the value and at most 2^(1/4) larger; values below the grid get code 0 (2.3e-10), and
    values above 2^31.5, inf and NaN get code 255, which decodes to inf."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    safe = torch.where(torch.isfinite(v) & (v > 0), v, torch.ones_like(v))
    codes = torch.ceil(torch.log2(safe) * _SCALE_STEPS_PER_OCTAVE) + _SCALE_OFFSET
    codes += (block_moduli(codes) < safe).to(codes.dtype)  # log2 rounded down
    codes -= (block_moduli(codes - 1) >= safe).to(codes.dtype)  # log2 rounded up
    codes = torch.where(v > 0, codes, torch.zeros_like(codes)).clamp_(0, _BOUND_OVERFLOW)
    codes[~torch.isfinite(v) & ~(v < 0)] = _BOUND_OVERFLOW  # inf and NaN
    return codes.to(torch.uint8).numpy()


def code_bounds(codes: np.ndarray) -> np.ndarray:
    """The upper bounds of :func:`bound_codes` (float64; code 255: inf)."""
    c = torch.from_numpy(np.array(codes, dtype=np.uint8))
    bounds = block_moduli(c)
    bounds[c == _BOUND_OVERFLOW] = math.inf
    return bounds.numpy()


def shared_dither(count: int, seed: int) -> torch.Tensor:
    """The round's dither in [-1/2, 1/2): every worker draws the same values from the same
    seed, so a receiver can subtract the sender's dither without it being sent."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=gen, dtype=torch.float64) - 0.5


def moniqua_encode(
    x: torch.Tensor,
    theta: float | torch.Tensor,
    bits: int,
    rounding: str,
    generator: torch.Generator | None = None,
    *,
    block: int = 0,
    dither: torch.Tensor | None = None,
) -> MoniquaMessage:
    """Quantize (x / B) mod 1 to ``bits`` bits per coordinate (x is flattened).

    theta is one bound for all values or one per block of ``block`` values (block=0: a single
    block), either as numbers or as their B's 1-byte codes (a uint8 tensor from
    :func:`scale_codes`, as the driver sends theta: the message then uses exactly those
    codes). rounding='dither' needs ``dither`` (:func:`shared_dither`), the same on every
    worker; 'stochastic' draws from ``generator``.
    """
    flat = x.detach().reshape(-1).to(torch.float64)
    block = block or max(flat.numel(), 1)
    coded = getattr(theta, "dtype", None) in (torch.uint8, np.dtype(np.uint8))
    thetas = torch.as_tensor(theta, dtype=None if coded else torch.float64).reshape(-1).cpu()
    n_blocks = -(-flat.numel() // block)
    if thetas.numel() == 1:
        thetas = thetas.expand(n_blocks)
    if thetas.numel() != n_blocks:
        raise ValueError(f"{thetas.numel()} thetas for {n_blocks} blocks of {block} values")
    if coded:
        moniqua_delta(bits, rounding)  # checks bits and rounding
        codes = thetas.clone()
    else:
        codes = scale_codes(thetas.to(torch.float64), bits, rounding)
    modulus = block_moduli(codes).repeat_interleave(block)[:flat.numel()].to(flat.device)
    levels = 1 << bits
    u = torch.remainder(flat / modulus, 1.0) * levels
    if rounding == "nearest":
        k = torch.ceil(u - 0.5)  # round half down: error in [-s/2, s/2)
    elif rounding == "dither":
        if dither is None or dither.numel() != u.numel():
            raise ValueError("rounding='dither' needs the round's shared dither, one per value")
        k = torch.ceil(u + dither.to(u.device) - 0.5)  # error of k - dither in [-s/2, s/2)
    else:
        noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
        k = torch.floor(u + noise)  # E[k] = u, error in (-s, s)
    levels_sent = k.to(torch.int64).remainder_(levels)  # level 2^b is level 0 (mod 1)
    return MoniquaMessage(pack_bits(levels_sent, bits), u.numel(), bits, block, codes)


def centred_mod(v: torch.Tensor, modulus: float | torch.Tensor) -> torch.Tensor:
    """v cmod B: the representative of v modulo B in [-B/2, B/2)."""
    return torch.remainder(v + modulus / 2, modulus) - modulus / 2


def moniqua_decode(msg: MoniquaMessage, x_local: torch.Tensor,
                   dither: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = ((q B - x_local) cmod B) + x_local, shaped and typed like ``x_local``; q is the
    level minus the shared dither when the sender dithered."""
    if x_local.numel() != msg.count:
        raise ValueError(f"message has {msg.count} values, local model {x_local.numel()}")
    y = x_local.detach().reshape(-1).to(torch.float64)
    q = unpack_bits(msg.payload.to(y.device), msg.bits, msg.count).to(torch.float64)
    if dither is not None:
        q -= dither.to(y.device)
    modulus = msg.modulus.to(y.device)
    x_hat = centred_mod(q * modulus * 2.0**-msg.bits - y, modulus) + y
    return x_hat.to(x_local.dtype).reshape(x_local.shape)


def moniqua_theta(max_abs_diff: float | torch.Tensor, margin: float = 2.0,
                  floor: float = 1e-8) -> float | torch.Tensor:
    """A safe theta: ``margin`` times the measured max |x_i - x_j| (one value, or one per
    block), at least ``floor``."""
    diff = torch.as_tensor(max_abs_diff, dtype=torch.float64)
    if not bool(torch.isfinite(diff).all() and (diff >= 0).all()):
        raise ValueError(f"max_abs_diff must be finite and >= 0, got {max_abs_diff!r}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin!r}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor!r}")
    theta = torch.clamp(margin * diff, min=floor)
    return theta if isinstance(max_abs_diff, torch.Tensor) else float(theta)


def block_max(v: torch.Tensor, block: int) -> torch.Tensor:
    """max |v| over each block of ``block`` values (the last block may be shorter)."""
    flat = v.detach().reshape(-1).abs()
    pad = -flat.numel() % block
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block).amax(1)


def wrapped(
    decoded: torch.Tensor,
    previous: torch.Tensor | None,
    theta: float | torch.Tensor,
    *,
    bits: int | None = None,
    rounding: str = "nearest",
) -> bool:
    """Heuristic wrap-around check for a decoded neighbour model.

    Rule: True when ``decoded`` is not finite, or when ``previous`` (the last decoded
    value of the same neighbour) is given and |decoded - previous| > B / 2 =
    theta + delta B anywhere (theta: one value, or one per value), the largest offset the
    bound allows between a correct decode and its reference. ``bits``/``rounding`` give
    delta; bits=None means delta = 0 (limit theta, the strictest). A wrap moves a
    coordinate by a multiple of B, so against a correct previous decode it shows up as a
    jump of at least (1 - 2 delta) B - m, m the neighbour's true movement, while a correct
    decode jumps at most 2 delta B + m. B/2 sits in the middle: reliable for fine
    quantization, coarse at 1 bit or 2-bit stochastic (delta = 1/4) where both sides meet
    at B/2 (false alarms from jitter). A neighbour that truly jumped by nearly a multiple
    of B aliases and is missed. Comparing with the *local* model would be useless: by
    construction every decode lies within B/2 of the local model, wrapped or not.
    """
    if not bool(torch.isfinite(decoded).all()):
        return True
    if previous is None or decoded.numel() == 0:
        return False
    delta = 0.0 if bits is None else moniqua_delta(bits, rounding)
    limit = torch.as_tensor(theta, dtype=torch.float64) / (1.0 - 2.0 * delta)  # = B / 2
    gap = (decoded.to(torch.float64) - previous.to(torch.float64)).abs().reshape(-1)
    return bool((gap > limit.to(gap.device)).any())


# -------------------------------------------------------------------------- CHOCO


@dataclass
class SignMessage:
    """Scaled sign: (||v||_1 / d) sign(v); 1 bit per value plus count and scale."""

    payload: torch.Tensor  # uint8 sign bits (1 = non-negative)
    count: int
    scale: float

    HEADER_BYTES = _COUNT_BYTES + _F32_BYTES

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.HEADER_BYTES

    def decompress(self) -> torch.Tensor:
        return unpack_signs(self.payload, self.count) * self.scale


def sign_compress(v: torch.Tensor) -> SignMessage:
    """Scaled sign compressor. Zeros are sent as +scale (see bitpack.pack_signs)."""
    flat = v.detach().reshape(-1)
    scale = float(flat.abs().sum() / max(flat.numel(), 1))
    return SignMessage(pack_signs(flat), flat.numel(), _as_f32(scale))


@dataclass
class QSGDMessage:
    """QSGD: scale * sign_i * level_i / s; signs and level indices bit packed."""

    signs: torch.Tensor  # uint8, 1 bit per value
    level_codes: torch.Tensor  # uint8, level indices 0..s packed at ``bits`` bits
    count: int
    levels: int  # s
    bits: int
    scale: float  # ||v||_2, divided by tau when rescaled

    HEADER_BYTES = _COUNT_BYTES + _BITS_BYTES + _BITS_BYTES + _F32_BYTES  # count, s, bits

    @property
    def nbytes(self) -> int:
        return self.signs.numel() + self.level_codes.numel() + self.HEADER_BYTES

    def decompress(self) -> torch.Tensor:
        idx = unpack_bits(self.level_codes, self.bits, self.count).to(torch.float32)
        return unpack_signs(self.signs, self.count) * idx * (self.scale / self.levels)


def qsgd_tau(dim: int, levels: int) -> float:
    """tau = 1 + min(d / s^2, sqrt(d) / s): Q/tau is a contraction (CHOCO's scaled QSGD)."""
    return 1.0 + min(dim / levels**2, math.sqrt(dim) / levels)


def qsgd_compress(
    v: torch.Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    rescale: bool = False,
) -> QSGDMessage:
    """QSGD with s = ``levels`` (1..255): unbiased, E[decompress] = v.

    Level index l_i = floor(s |v_i| / ||v|| + U[0,1)). With ``rescale`` the scale is
    divided by qsgd_tau (biased but contractive, as CHOCO-SGD requires).
    """
    if not 1 <= levels <= 255:
        raise ValueError(f"levels must be in 1..255, got {levels!r}")
    flat = v.detach().reshape(-1).to(torch.float32)
    bits = next(b for b in VALID_BITS if (1 << b) > levels)
    norm = float(torch.linalg.vector_norm(flat))
    if norm > 0:
        ratio = flat.abs() * (levels / norm)
        noise = torch.rand(ratio.shape, generator=generator, device=ratio.device)
        idx = torch.floor(ratio + noise).clamp_(max=levels).to(torch.int64)
    else:
        idx = torch.zeros(flat.shape, dtype=torch.int64, device=flat.device)
    scale = norm / qsgd_tau(flat.numel(), levels) if rescale else norm
    return QSGDMessage(
        pack_signs(flat), pack_bits(idx, bits), flat.numel(), levels, bits, _as_f32(scale)
    )


def choco_compress(
    v: torch.Tensor,
    compressor: str = "sign",
    *,
    levels: int = 16,
    generator: torch.Generator | None = None,
    rescale: bool = True,
) -> SignMessage | QSGDMessage:
    """CHOCO's Q(v) for v = x_half - x_hat_self: ``sign`` or ``qsgd``."""
    if compressor == "sign":
        return sign_compress(v)
    if compressor == "qsgd":
        return qsgd_compress(v, levels, generator, rescale=rescale)
    raise KeyError(f"unknown CHOCO compressor {compressor!r}; valid: sign, qsgd")


def _as_f32(value: float) -> float:
    """Round a Python float to float32 precision, as it travels on the wire."""
    return float(torch.tensor(value, dtype=torch.float32))
