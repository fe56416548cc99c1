"""Compressed gossip messages: Moniqua and CHOCO-SGD compressors (pure torch).

Every message is a plain dataclass of tensors and Python scalars (picklable, so it can
travel through an object store) with ``.nbytes``: the real wire size, i.e. the packed
payload plus a small header counted at the sizes named in each class.

Moniqua (Lu & De Sa, ICML 2020). With b bits, s = 2^-b, rounding error at most delta
(delta = s stochastic, s/2 nearest) and B = 2 theta / (1 - 2 delta):

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
Stochastic rounding has |e| < s strictly. B is rounded up by two ulps so that
theta <= B (1 - 2 delta) / 2 holds in floating point too. Encode and decode compute in
float64 (float32 would lose log2(|x| / B) bits in the mod-1 step); beyond that the
guarantee holds up to rounding of order 1e-16 |x|. Keep a margin on theta (moniqua_theta).

Update (background.md): x_i <- x_i + sum_j W_ij (x_hat_j - x_hat_i) - lr g_i, i.e.
``choco_step(x_i, x_hat_i, x_hat_nbrs, w, gamma=1) - lr * g_i``. With theta tracking the
measured spread, the decode noise (up to delta B, proportional to theta) is large at 2
bits; on an 8-ring gamma = 1 diverges with stochastic rounding, and nearest rounding has a
dead zone (differences below the grid step s B round to 0). A consensus step gamma ~ 0.3
converges (see tests/test_compression.py).

CHOCO-SGD (Koloskova et al. 2019): x_half = x - lr g; q = Q(x_half - x_hat_self);
every holder of a copy does x_hat_j += decompress(q_j); then
x = x_half + gamma sum_j w_ij (x_hat_j - x_hat_self) (see :func:`choco_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from strategies.bitpack import VALID_BITS, pack_bits, pack_signs, unpack_bits, unpack_signs

ROUNDINGS = ("stochastic", "nearest")

# Header sizes on the wire: count as uint32, bits as uint8, scales as float32 except
# Moniqua's B, sent as float64 because decoding is done in float64.
_COUNT_BYTES, _BITS_BYTES, _F32_BYTES, _F64_BYTES = 4, 1, 4, 8


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


@dataclass
class MoniquaMessage:
    """Moniqua message: packed level indices plus a header (count, bits, B)."""

    payload: torch.Tensor  # uint8, ceil(count * bits / 8) bytes
    count: int
    bits: int
    modulus: float  # B = 2 theta / (1 - 2 delta)

    HEADER_BYTES = _COUNT_BYTES + _BITS_BYTES + _F64_BYTES

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.HEADER_BYTES

    def decode(self, x_local: torch.Tensor) -> torch.Tensor:
        return moniqua_decode(self, x_local)


def moniqua_delta(bits: int, rounding: str) -> float:
    """Worst-case rounding error delta, in units of B: s for stochastic, s/2 for nearest."""
    if bits not in VALID_BITS:
        raise ValueError(f"strategy.bits must be one of {VALID_BITS}, got {bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"strategy.rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if bits == 1 and rounding == "stochastic":
        raise ValueError(
            "strategy.rounding='stochastic' needs at least 2 bits (delta = s = 1/2 leaves "
            "no room for theta); use strategy.rounding='nearest' with 1 bit"
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


def moniqua_encode(
    x: torch.Tensor,
    theta: float,
    bits: int,
    rounding: str,
    generator: torch.Generator | None = None,
) -> MoniquaMessage:
    """Quantize (x / B) mod 1 to ``bits`` bits per coordinate (x is flattened)."""
    modulus = moniqua_modulus(theta, bits, rounding)
    levels = 1 << bits
    u = torch.remainder(x.detach().reshape(-1).to(torch.float64) / modulus, 1.0) * levels
    if rounding == "nearest":
        k = torch.ceil(u - 0.5)  # round half down: error in [-s/2, s/2)
    else:
        noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
        k = torch.floor(u + noise)  # E[k] = u, error in (-s, s)
    codes = k.to(torch.int64).remainder_(levels)  # level 2^b is level 0 (mod 1)
    return MoniquaMessage(pack_bits(codes, bits), u.numel(), bits, modulus)


def centred_mod(v: torch.Tensor, modulus: float) -> torch.Tensor:
    """v cmod B: the representative of v modulo B in [-B/2, B/2)."""
    return torch.remainder(v + modulus / 2, modulus) - modulus / 2


def moniqua_decode(msg: MoniquaMessage, x_local: torch.Tensor) -> torch.Tensor:
    """x_hat = ((q B - x_local) cmod B) + x_local, shaped and typed like ``x_local``."""
    if x_local.numel() != msg.count:
        raise ValueError(f"message has {msg.count} values, local model {x_local.numel()}")
    y = x_local.detach().reshape(-1).to(torch.float64)
    q = unpack_bits(msg.payload.to(y.device), msg.bits, msg.count).to(torch.float64)
    q *= msg.modulus * 2.0**-msg.bits
    x_hat = centred_mod(q - y, msg.modulus) + y
    return x_hat.to(x_local.dtype).reshape(x_local.shape)


def moniqua_theta(max_abs_diff: float, margin: float = 2.0, floor: float = 1e-8) -> float:
    """A safe theta: ``margin`` times the measured max |x_i - x_j|, at least ``floor``."""
    if not math.isfinite(max_abs_diff) or max_abs_diff < 0:
        raise ValueError(f"max_abs_diff must be finite and >= 0, got {max_abs_diff!r}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin!r}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor!r}")
    return max(margin * max_abs_diff, floor)


def wrapped(
    decoded: torch.Tensor,
    previous: torch.Tensor | None,
    theta: float,
    *,
    bits: int | None = None,
    rounding: str = "nearest",
) -> bool:
    """Heuristic wrap-around check for a decoded neighbour model.

    Rule: True when ``decoded`` is not finite, or when ``previous`` (the last decoded
    value of the same neighbour) is given and ||decoded - previous||_inf > B / 2 =
    theta + delta B, the largest offset the bound allows between a correct decode and
    its reference. ``bits``/``rounding`` give delta; bits=None means delta = 0 (limit
    theta, the strictest). A wrap moves a coordinate by a multiple of B, so against a
    correct previous decode it shows up as a jump of at least (1 - 2 delta) B - m, m the
    neighbour's true movement, while a correct decode jumps at most 2 delta B + m.
    B/2 sits in the middle: reliable for fine quantization, coarse at 1 bit or 2-bit
    stochastic (delta = 1/4) where both sides meet at B/2 (false alarms from jitter).
    A neighbour that truly jumped by nearly a multiple of B aliases and is missed.
    Comparing with the *local* model would be useless: by construction every decode
    lies within B/2 of the local model, wrapped or not.
    """
    if not bool(torch.isfinite(decoded).all()):
        return True
    if previous is None or decoded.numel() == 0:
        return False
    delta = 0.0 if bits is None else moniqua_delta(bits, rounding)
    limit = theta / (1.0 - 2.0 * delta)  # = B / 2
    gap = (decoded.to(torch.float64) - previous.to(torch.float64)).abs().max()
    return bool(gap > limit)


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


def choco_step(
    x_half: torch.Tensor,
    x_hat_self: torch.Tensor,
    x_hat_nbrs: Sequence[torch.Tensor],
    weights: Sequence[float],
    gamma: float,
) -> torch.Tensor:
    """x = x_half + gamma * sum_j w_ij (x_hat_j - x_hat_self), j over the neighbours.

    CHOCO: ``x_hat_self`` and ``x_hat_nbrs`` are the public copies *after* this round's
    ``x_hat += decompress(q)`` updates. Moniqua: pass x_i as ``x_half`` and the decoded
    messages (own message decoded against x_i as ``x_hat_self``), then subtract lr g_i.
    """
    if len(x_hat_nbrs) != len(weights):
        raise ValueError(f"{len(x_hat_nbrs)} neighbour copies but {len(weights)} weights")
    mix = torch.zeros_like(x_half)
    for x_hat_j, w in zip(x_hat_nbrs, weights):
        mix.add_(x_hat_j - x_hat_self, alpha=w)
    return x_half + gamma * mix


# ------------------------------------------------------------------------ registry

COMPRESSORS: dict[str, Callable[..., object]] = {
    "none": dense_encode,
    "moniqua": moniqua_encode,
    "choco": choco_compress,
}


def get_compressor(name: str) -> Callable[..., object]:
    """The encode function registered as ``name``; KeyError listing valid names."""
    try:
        return COMPRESSORS[name]
    except KeyError:
        valid = ", ".join(COMPRESSORS)
        raise KeyError(f"unknown compressor {name!r}; valid: {valid}") from None


def _as_f32(value: float) -> float:
    """Round a Python float to float32 precision, as it travels on the wire."""
    return float(torch.tensor(value, dtype=torch.float32))
