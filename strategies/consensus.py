"""Gossip consensus methods and Moniqua's theta controller: the math of a gossip round, with
its state explicit (pure torch and numpy; no Ray, no orchestrator imports).

A consensus method is registered per compressor in ``strategies.registry.COMPRESSORS``; its
constructor takes the gossip options (any object with compress, bits, rounding, block_size,
gamma, theta_margin, choco_compressor) and returns an object with pure methods, optax style:
the state goes in and comes back out, nothing is kept on the object between calls.

    method = build_method(options)             # COMPRESSORS.get(options.compress).build
    state = method.init(x)                     # per worker
    msg, state = method.encode(x, step_vec, theta, seed, step, rank, state)
    x, state, stats = method.mix(x, step_vec, messages, weights, rank, state)
    state = method.reset(state)                # membership changed: forget the neighbours

x is the worker's flat model, step_vec its local SGD step (lr x momentum buffer: the local
update is x - step_vec), messages the round's messages by rank (the worker's own included)
and weights its row of the mixing matrix W (self included). The updates, with
x^_j the neighbour j as the worker sees it (docs/algorithms.md):

  none (D-PSGD):  x_i <- sum_j W_ij x_j - lr g_i
  moniqua:        x_i <- x_i + gamma sum_j W_ij (x^_j - x^_i) - lr g_i
  choco:          x^_j += Q_j;  x_i <- x_i - lr g_i + gamma sum_j W_ij (x^_j - x^_i)

A neighbour whose message did not arrive is left out of the round: its weight stays home
(added to W_ii). ``stats`` are what the driver's theta controller reads: ``wraps`` (decodes
that could not be trusted), ``max_diff`` (per block: the largest distance to a decoded
neighbour) and ``max_step`` (per block: the largest local step). Only Moniqua uses them
(``control``): they travel to the driver as 1-byte codes rounded up (``control_message``,
``read_control``), and theta travels back as its modulus' 1-byte code per block
(``theta_message``): per worker and round, 2 bytes per block and a 4-byte wrap count up,
1 byte per block down.

Random draws depend on (seed, step, rank) only, so a run is reproducible whatever the
placement: stochastic rounding and QSGD draw from
``torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1009 + rank)``, Moniqua's
dither is ``shared_dither(numel, seed * 1_000_003 + step)``, the same on every worker.

Moniqua's bound theta (ThetaController, run by the driver): theta >= max |x_i - x_j| per block
of block_size values, margin x the smaller of two upper bounds on the spread, (a) D-PSGD's
cap lr max|g| / (spectral gap of W) and (b) the largest distance to a decoded neighbour plus
two local steps. (b) alone can run away (its decoding error grows with theta); (a) caps it but
holds in steady state only, and quantization noise widens the spread beyond D-PSGD's. So after
a membership change or a detected wrap-around the driver measures the spread on the replicas
themselves (all pairs, per block: ``resync``) and lets theta stay up to that spread for
SETTLE_ROUNDS rounds while they settle; a wrap also doubles (a)'s factor cap for good.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch

from strategies.compression import (
    DenseMessage,
    MoniquaMessage,
    QSGDMessage,
    SignMessage,
    block_max,
    bound_codes,
    choco_compress,
    code_bounds,
    code_thetas,
    dense_encode,
    moniqua_decode,
    moniqua_delta,
    moniqua_encode,
    moniqua_theta,
    scale_codes,
    shared_dither,
    wrapped,
)
from strategies.registry import COMPRESSORS
from strategies.topology import mixing_matrix, spectral_gap

Message = DenseMessage | MoniquaMessage | SignMessage | QSGDMessage

SETTLE_ROUNDS = 20  # rounds after a resync in which theta may stay up to the measured spread
HISTORY = 20  # rounds of local steps that bound (a) looks back on


class ConsensusMethod(Protocol):
    """What every registered compressor's constructor returns. ``control``: whether the method
    needs the driver's theta (then the driver sends it every round, theta_message, and the
    workers send their mix stats back, control_message); without it theta is None."""

    control: bool

    def init(self, x: torch.Tensor) -> Any: ...

    def encode(self, x: torch.Tensor, step_vec: torch.Tensor, theta: float | np.ndarray,
               seed: int, step: int, rank: int, state: Any) -> tuple[Message, Any]: ...

    def mix(self, x: torch.Tensor, step_vec: torch.Tensor, messages: Mapping[int, Message],
            weights: Mapping[int, float], rank: int,
            state: Any) -> tuple[torch.Tensor, Any, dict]: ...

    def reset(self, state: Any) -> Any: ...


def build_method(options: Any) -> ConsensusMethod:
    """The consensus method of ``options.compress``, built from the gossip options."""
    return COMPRESSORS.get(options.compress).build(options)


def round_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of a worker's stochastic rounding in one round."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 1009 + rank)


def round_dither(count: int, seed: int, step: int) -> torch.Tensor:
    """The round's dither, the same on every worker (Moniqua, rounding=dither)."""
    return shared_dither(count, seed * 1_000_003 + step)


def _arrived(messages: Mapping[int, Message], weights: Mapping[int, float],
             rank: int) -> tuple[dict[int, Message], dict[int, float]]:
    """The messages in the order of ``weights`` and their weights; the weight of a neighbour
    whose message did not arrive stays home."""
    if rank not in messages:
        raise ValueError(f"messages must hold the worker's own message (rank {rank})")
    unknown = sorted(set(messages) - set(weights))
    if unknown:
        raise ValueError(f"messages from ranks {unknown} that have no weight in weights")
    msgs = {j: messages[j] for j in weights if j in messages}
    w = {j: weights[j] for j in msgs}
    w[rank] += sum(weights.values()) - sum(w.values())  # missing weight stays home
    return msgs, w


def _block(options: Any, x: torch.Tensor) -> int:
    return options.block_size or x.numel()


def _max_step(step_vec: torch.Tensor, block: int) -> np.ndarray:
    return block_max(step_vec, block).cpu().numpy()


# ------------------------------------------------------------------------ D-PSGD


@dataclass(frozen=True)
class DenseState:
    """D-PSGD keeps nothing between rounds."""


@COMPRESSORS.register("none", "fp32 messages: D-PSGD (Lian et al. 2017), "
                      "x_i <- sum_j W_ij x_j - lr g_i")
class DPSGD:
    """Plain D-PSGD with fp32 messages."""

    control = False  # no theta, no control traffic

    def __init__(self, options: Any) -> None:
        self.options = options

    def init(self, x: torch.Tensor) -> DenseState:
        return DenseState()

    def reset(self, state: DenseState) -> DenseState:
        return state

    def encode(self, x: torch.Tensor, step_vec: torch.Tensor, theta: float | np.ndarray,
               seed: int, step: int, rank: int,
               state: DenseState) -> tuple[DenseMessage, DenseState]:
        return dense_encode(x), state

    def mix(self, x: torch.Tensor, step_vec: torch.Tensor, messages: Mapping[int, Message],
            weights: Mapping[int, float], rank: int,
            state: DenseState) -> tuple[torch.Tensor, DenseState, dict]:
        msgs, w = _arrived(messages, weights, rank)
        dense = {j: msg.decompress().to(x) for j, msg in msgs.items()}
        x_new = sum(w[j] * dense[j] for j in dense) - step_vec
        max_diff = np.array([max(float((dense[j] - x).abs().max()) for j in dense)])
        return x_new, state, {"wraps": 0, "max_diff": max_diff,
                              "max_step": _max_step(step_vec, _block(self.options, x))}


# ----------------------------------------------------------------------- Moniqua


@dataclass(frozen=True)
class MoniquaState:
    """last_decoded: each neighbour's previous decode (wrap detection); dither: the round's
    shared dither, drawn by encode and used by mix (None unless rounding=dither)."""

    last_decoded: Mapping[int, torch.Tensor] = field(default_factory=dict)
    dither: torch.Tensor | None = None


@COMPRESSORS.register("moniqua", "Moniqua (Lu & De Sa 2020): modulo quantization to "
                      "strategy.bits bits, per-block bound theta")
class Moniqua:
    """Moniqua's encode and update; theta comes from the driver (ThetaController)."""

    control = True  # theta down (theta_message), the mix stats up (control_message)

    def __init__(self, options: Any) -> None:
        self.options = options
        # The jump check is reliable only while delta < 1/4 (strategies.compression.wrapped):
        # at 1 bit and 2-bit stochastic only non-finite decodes are caught.
        self.check_jumps = moniqua_delta(options.bits, options.rounding) < 0.25

    def init(self, x: torch.Tensor) -> MoniquaState:
        return MoniquaState()

    def reset(self, state: MoniquaState) -> MoniquaState:
        return replace(state, last_decoded={})

    def encode(self, x: torch.Tensor, step_vec: torch.Tensor, theta: float | np.ndarray,
               seed: int, step: int, rank: int,
               state: MoniquaState) -> tuple[MoniquaMessage, MoniquaState]:
        opt = self.options
        dither = round_dither(x.numel(), seed, step) if opt.rounding == "dither" else None
        # Per block, or one for all: numbers, or their 1-byte codes as the driver sends them
        # (theta_message; used as they are). Copied: from Ray it arrives as a read-only array.
        if isinstance(theta, torch.Tensor):
            theta = theta if theta.dtype == torch.uint8 else theta.to(torch.float64)
        else:
            theta = np.array(theta)
            theta = torch.from_numpy(theta if theta.dtype == np.uint8
                                     else theta.astype(np.float64))
        msg = moniqua_encode(x, theta, opt.bits, opt.rounding,
                             round_generator(x.device, seed, step, rank),
                             block=opt.block_size, dither=dither)
        return msg, replace(state, dither=dither)

    def mix(self, x: torch.Tensor, step_vec: torch.Tensor, messages: Mapping[int, Message],
            weights: Mapping[int, float], rank: int,
            state: MoniquaState) -> tuple[torch.Tensor, MoniquaState, dict]:
        msgs, w = _arrived(messages, weights, rank)
        block, dither = _block(self.options, x), state.dither
        last = dict(state.last_decoded)
        half_b = msgs[rank].modulus / 2  # B / 2 per value: the largest correct offset
        own = moniqua_decode(msgs[rank], x, dither)
        mix, spread = torch.zeros_like(x), torch.zeros(-(-x.numel() // block))
        wraps = 0
        for j, msg in msgs.items():
            if j == rank:
                continue
            decoded = moniqua_decode(msg, x, dither)
            previous = last.get(j) if self.check_jumps else None
            if wrapped(decoded, previous, half_b):  # bits=None: the limit is B / 2
                wraps += 1  # this neighbour's value cannot be trusted this round
            else:
                mix += w[j] * (decoded - own)
            last[j] = decoded
            spread = torch.maximum(spread, block_max(decoded - x, block).float().cpu())
        x_new = x + self.options.gamma * mix - step_vec
        return x_new, replace(state, last_decoded=last), {
            "wraps": wraps, "max_diff": spread.numpy(),  # per block: the next round's theta
            "max_step": _max_step(step_vec, block)}


# ------------------------------------------------------------------------- CHOCO


@dataclass(frozen=True)
class ChocoState:
    """public: the public copies x^_j of the worker itself and of its neighbours."""

    public: Mapping[int, torch.Tensor] = field(default_factory=dict)


@COMPRESSORS.register("choco", "CHOCO-SGD (Koloskova et al. 2019): compressed differences "
                      "to public copies, strategy.choco_compressor sign or qsgd")
class Choco:
    """CHOCO-SGD: every worker sends Q(x_half - x^_self) and keeps public copies."""

    control = False  # no theta, no control traffic

    def __init__(self, options: Any) -> None:
        self.options = options

    def init(self, x: torch.Tensor) -> ChocoState:
        return ChocoState()

    def reset(self, state: ChocoState) -> ChocoState:
        return replace(state, public={})

    def encode(self, x: torch.Tensor, step_vec: torch.Tensor, theta: float | np.ndarray,
               seed: int, step: int, rank: int,
               state: ChocoState) -> tuple[SignMessage | QSGDMessage, ChocoState]:
        msg = choco_compress(x - step_vec - state.public.get(rank, torch.zeros_like(x)),
                             self.options.choco_compressor,
                             generator=round_generator(x.device, seed, step, rank))
        return msg, state

    def mix(self, x: torch.Tensor, step_vec: torch.Tensor, messages: Mapping[int, Message],
            weights: Mapping[int, float], rank: int,
            state: ChocoState) -> tuple[torch.Tensor, ChocoState, dict]:
        msgs, w = _arrived(messages, weights, rank)
        public = dict(state.public)
        for j, msg in msgs.items():
            public[j] = public.get(j, torch.zeros_like(x)) + msg.decompress().to(x)
        x_half = x - step_vec
        me = public[rank]
        x_new = x_half + self.options.gamma * sum(w[j] * (public[j] - me)
                                                  for j in msgs if j != rank)
        max_diff = np.array([max([float((public[j] - me).abs().max()) for j in msgs] + [0.0])])
        return x_new, replace(state, public=public), {
            "wraps": 0, "max_diff": max_diff, "max_step": _max_step(step_vec, _block(
                self.options, x))}


# -------------------------------------------------------------- control traffic


def theta_message(theta: np.ndarray, bits: int, rounding: str) -> np.ndarray:
    """theta as the driver sends it to every worker (Moniqua's control traffic down): per
    block, the 1-byte code of its modulus B, rounded up (compression.scale_codes: the code the
    worker would compute from the exact theta). Moniqua.encode uses the codes as they are;
    the theta they stand for (compression.code_thetas) is >= theta, at most 2^(1/4) larger."""
    return scale_codes(torch.from_numpy(np.array(theta, dtype=np.float64)).reshape(-1), bits,
                       rounding).numpy()


def control_message(stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A worker's mix stats as they travel to the driver (Moniqua's control traffic up): the
    wrap count (int32) and, per block, max_diff and max_step as 1-byte codes rounded up
    (compression.bound_codes: upper bounds stay upper bounds, at most 2^(1/4) looser)."""
    return {"wraps": np.array(stats["wraps"], dtype=np.int32),
            "max_diff": bound_codes(stats["max_diff"]),
            "max_step": bound_codes(stats["max_step"])}


def read_control(message: Mapping[str, Any]) -> dict[str, Any]:
    """The stats of a ``control_message``, for ThetaController.update (bounds as float64)."""
    return {"wraps": int(message["wraps"]), "max_diff": code_bounds(message["max_diff"]),
            "max_step": code_bounds(message["max_step"])}


def control_nbytes(message: Mapping[str, Any]) -> int:
    """Bytes of a ``control_message`` on the wire (its arrays)."""
    return sum(int(np.asarray(v).nbytes) for v in message.values())


def theta_breached(theta: np.ndarray, replicas: Mapping[int, np.ndarray],
                   pairs: Sequence[tuple[int, int]], bits: int, rounding: str,
                   block_size: int) -> bool:
    """Whether two neighbours' replicas differ, in some block, by more than the theta their
    next messages are quantized for (as the workers read theta_message's codes). Moniqua's
    decode is within delta B of the sender's value only within theta: past it a decode can
    wrap by a multiple of B, which the workers cannot always see (at 1 bit their jump check
    is off). `pairs` are (rank, neighbour) of the next round; ranks missing from `replicas`
    are skipped."""
    bound = code_thetas(torch.from_numpy(theta_message(theta, bits, rounding)), bits, rounding)
    for i, j in pairs:
        if i in replicas and j in replicas:
            diff = torch.from_numpy(np.asarray(replicas[i]) - np.asarray(replicas[j]))
            if bool((block_max(diff, block_size or diff.numel()) > bound).any()):
                return True
    return False


# -------------------------------------------------------------- theta controller


@lru_cache(maxsize=64)
def mixing_gap(live: tuple[int, ...], topology: str) -> float:
    """Spectral gap of W over the live workers, per round. A time-varying topology is taken
    over one period (log2 n rounds), its gap spread evenly over the rounds."""
    n = len(live)
    if n < 2:
        return 1.0
    period = max(1, math.ceil(math.log2(n))) if topology == "one_peer_exp" else 1
    product = torch.eye(n, dtype=torch.float64)
    for step in range(period):
        product = mixing_matrix(list(live), topology, step) @ product
    gap = spectral_gap(product)
    return max(1 - (1 - gap) ** (1 / period), 1e-3)


@dataclass(frozen=True)
class ThetaState:
    """theta: the bound per block (float64; one value before the first round); cap: (a)'s
    factor; held: the spread measured at the last resync, which theta may stay up to until
    round resynced_at + SETTLE_ROUNDS; recent_steps: the largest local step per block of the
    last HISTORY rounds (oldest first)."""

    theta: np.ndarray = field(default_factory=lambda: np.full(1, 1e-8))
    cap: float = 2.0
    held: np.ndarray = field(default_factory=lambda: np.zeros(1))
    resynced_at: int = -SETTLE_ROUNDS
    recent_steps: tuple[np.ndarray, ...] = ()


class ThetaController:
    """Moniqua's theta, set by the driver from the workers' mix stats (pure: the state is
    returned, never kept)."""

    def __init__(self, margin: float, block_size: int, settle_rounds: int = SETTLE_ROUNDS,
                 history: int = HISTORY) -> None:
        self.margin, self.block_size = margin, block_size
        self.settle_rounds, self.history = settle_rounds, history

    def init(self) -> ThetaState:
        return ThetaState(resynced_at=-self.settle_rounds)

    def update(self, state: ThetaState, stats: Sequence[Mapping[str, Any]],
               live: Sequence[int], topology: str,
               step: int) -> tuple[np.ndarray, ThetaState, bool]:
        """(theta, state, resync_needed) after a round whose workers in ``live`` (sorted ranks
        of those that sent) mixed and returned ``stats``. On a wrap the factor cap doubles and
        theta is kept until the caller measures the replicas (``resync``); otherwise theta =
        margin x the smaller of (a) cap lr max|g| / gap and (b) the distance seen to decoded
        neighbours plus both sides' next local step."""
        if not stats:
            return state.theta, state, False
        recent = (state.recent_steps + (np.max([s["max_step"] for s in stats], axis=0),))
        state = replace(state, recent_steps=recent[-self.history:])
        if sum(s["wraps"] for s in stats):  # a decode was not to be trusted
            return state.theta, replace(state, cap=2 * state.cap), True
        seen = np.max([s["max_diff"] + 2 * s["max_step"] for s in stats], axis=0)
        if not np.isfinite(seen).all():
            return state.theta, state, False
        limit = state.cap * np.max(state.recent_steps, axis=0) / mixing_gap(tuple(live),
                                                                          topology)
        if step - state.resynced_at <= self.settle_rounds:
            limit = np.maximum(limit, state.held)
        theta = moniqua_theta(torch.from_numpy(np.minimum(seen, limit)), self.margin).numpy()
        return theta, replace(state, theta=theta), False

    def can_resync(self, state: ThetaState) -> bool:
        """Whether ``resync`` has what it needs (a local step seen): the driver then measures
        the replicas after a membership change."""
        return bool(state.recent_steps)

    def resync(self, state: ThetaState, replicas: Mapping[int, np.ndarray] | Sequence[np.ndarray],
               step: int) -> ThetaState:
        """theta per block measured on the replicas themselves: their spread over all pairs
        plus two local steps; theta may hold to that spread for settle_rounds after ``step``."""
        rows = list(replicas.values()) if isinstance(replicas, Mapping) else list(replicas)
        if not rows or not state.recent_steps:
            return state
        states = torch.from_numpy(np.stack(rows))
        spread = block_max(states.amax(0) - states.amin(0), self.block_size or states.shape[1])
        theta = moniqua_theta(spread + torch.from_numpy(2 * state.recent_steps[-1]),
                              self.margin).numpy()
        return replace(state, theta=theta, held=theta / self.margin, resynced_at=step)

    @staticmethod
    def state_dict(state: ThetaState) -> dict[str, Any]:
        """The state as tensors and numbers, for a checkpoint."""
        return {"theta": torch.from_numpy(np.array(state.theta)), "cap": float(state.cap),
                "held": torch.from_numpy(np.array(state.held)),
                "resynced_at": int(state.resynced_at),
                "recent_steps": torch.from_numpy(np.array(state.recent_steps))}

    def load_state_dict(self, saved: Mapping[str, Any]) -> ThetaState:
        """The inverse of ``state_dict`` (held and resynced_at default as in ``init``)."""
        default = self.init()
        held = saved.get("held")
        return ThetaState(
            theta=saved["theta"].numpy(), cap=float(saved["cap"]),
            held=default.held if held is None else held.numpy(),
            resynced_at=int(saved.get("resynced_at", default.resynced_at)),
            recent_steps=tuple(saved["recent_steps"].numpy())[-self.history:])
