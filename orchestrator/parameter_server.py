"""The parameter-server step: the driver's model, the workers' gradients, one robust update.

Each step the driver publishes its parameters once (ray.put), every live worker returns the
gradient of its own mini-batch (`orchestrator.workers.Worker`), and `Aggregation` turns the
gradients that arrived into one update direction, which the driver's optimizer applies. The
math (rules, pre-aggregation, attacks, wire formats) lives in strategies/; this file wires it
to the configuration and keeps its state explicit for checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from cloud.pool import Machine
from orchestrator.config import Config
from orchestrator.models import flat_grads, float_buffers, share_flat
from orchestrator.optimizer import build_optimizer, clip_by_norm, lr_at
from orchestrator.step import OneStepAtATime, StepOutcome, TooFewWorkers
from orchestrator.workers import RemoteWorker, WorkerPool
from strategies.attacks import AttackUndefined, byzantine_ranks
from strategies.preaggregation import preaggregation_chain
from strategies.registry import ATTACKS
from strategies.rules import build_rule, check_workers, wire

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Randomness of one step (attacks, bucketing): a function of (seed, step) alone, so a
    resumed run draws exactly what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def finite_rows(grads: Tensor) -> Tensor:
    """Which rows hold only finite values. A row is finite iff its sum is, unless the sum
    overflowed: such rows are checked value by value (30x cheaper than
    isfinite(grads).all(1), which writes a bool copy)."""
    finite = torch.isfinite(grads.sum(dim=1))
    for row in (~finite).nonzero().flatten().tolist():
        finite[row] = bool(torch.isfinite(grads[row]).all())
    return finite


class Aggregation:
    """From the gradients that arrived to one update direction.

    In order: simulated Byzantine workers replace their rows (omniscient attacks see the
    honest gradients of the step: this is the one place where that happens; an attack that
    cannot be forged for the arrivals, `AttackUndefined`, makes the step one with too few
    workers), non-finite rows are rejected, the rule's requirement is checked against the
    rows left, then the pre-aggregation steps and the rule run as one transform whose state
    (`self.state`, e.g. centered clipping's previous aggregate) is what the checkpoint saves.
    """

    def __init__(self, cfg: Config) -> None:
        st, byz = cfg.strategy, cfg.byzantine
        self.seed, self.rule, self.on_too_few = cfg.seed, st.name, st.on_too_few
        self.f = byz.f if st.f is None else st.f
        self.transform = preaggregation_chain(st.pre, st, build_rule(st.name, st))
        self.state = self.transform.init()
        self.byzantine = set(byzantine_ranks(cfg.workers, byz.f, cfg.seed))
        entry = ATTACKS.get(byz.attack)
        self.attack = entry.build if byz.f and not entry.extra["data_side"] else None
        self.attack_params = {k: getattr(byz, k) for k in entry.extra["options"]}
        self.forge = wire(st.name).forge  # what a Byzantine worker can send on the rule's wire
        self.rejected = 0  # non-finite gradients kept away from the model
        self._warned_too_few = False

    def __call__(self, grads: Tensor, ranks: list[int], step: int,
                 agree: Callable[[Tensor], Tensor] = lambda finite: finite) -> Tensor | None:
        """The update direction from one row per rank, or None when the step is skipped.
        `agree`: from the rows' finite flags to those every shard agrees on (the collective
        plane runs this on a block of coordinates: a row is kept only if it is finite in
        every block)."""
        gen = step_generator(self.seed, step)
        try:
            grads = self._inject_attack(grads, ranks, gen)
        except AttackUndefined as undefined:  # e.g. alie's z with 2 arrivals: too few
            # The rule's own requirement names the cause best where the arrivals miss it too.
            reason = check_workers(self.rule, self.transform.rows(len(ranks)), self.f)
            self._too_few(step, reason or f"{len(ranks)} live workers: {undefined}")
            return None
        finite = agree(finite_rows(grads))
        rejected = int((~finite).sum())  # identified faulty: at most f - k of the rest lie
        self.rejected += rejected
        if rejected:
            grads = grads[finite]
        f = max(self.f - rejected, 0)
        if reason := check_workers(self.rule, self.transform.rows(len(grads)), f):
            self._too_few(step, reason)
            return None
        update, self.state = self.transform.update(grads, f, self.state, gen)
        return update

    def _too_few(self, step: int, reason: str) -> None:
        if self.on_too_few == "fail":
            raise TooFewWorkers(f"step {step}: {reason} (strategy.on_too_few=fail)")
        if not self._warned_too_few:
            log.warning("step %d: %s; skipping such steps (strategy.on_too_few=skip)",
                        step, reason)
            self._warned_too_few = True

    def _inject_attack(self, grads: Tensor, ranks: list[int], gen: torch.Generator) -> Tensor:
        """Rows of Byzantine ranks become the attack's output, computed from the honest rows."""
        rows = [i for i, r in enumerate(ranks) if r in self.byzantine]
        honest = [i for i, r in enumerate(ranks) if r not in self.byzantine]
        if self.attack is None or not rows or not honest:
            return grads
        forged = self.attack(grads[honest], len(rows), len(ranks), gen, **self.attack_params)
        grads = grads.clone()
        grads[rows] = self.forge(forged).to(grads.dtype)
        return grads


class ParameterServer(OneStepAtATime):
    """The `TrainingStep` of the parameter-server family: the driver owns model and optimizer."""

    actor_class = RemoteWorker
    checkpoint_before_drain = False  # workers hold no state of their own

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        self.cfg, self.model = cfg, model
        params = list(model.parameters())
        self.n_params = sum(p.numel() for p in params)
        self.has_buffers = bool(float_buffers(model))
        # Parameters+buffers and the gradients each live in one flat vector that the tensors
        # view: publishing is one ray.put of it, applying an update one copy.
        self.flat = share_flat(params + float_buffers(model))
        self.grad = flat_grads(params)
        self.optimizer = build_optimizer(cfg.optim, params)
        self.aggregation = Aggregation(cfg)
        self.decode = wire(cfg.strategy.name).decode

    def actor_kwargs(self, rank: int, workers: WorkerPool | None) -> dict[str, Any]:
        return {"byzantine": rank in self.aggregation.byzantine}

    def run_step(self, step: int, workers: WorkerPool, reclaim: list[Machine]) -> StepOutcome:
        state_ref = ray.put(self.flat.numpy())  # published once, read by all (zero-copy)
        called = len(workers.live)  # each of them reads the parameters
        results, lost = workers.gradients(state_ref, step, reclaim=reclaim)
        sent = sum(r.nbytes for r in results)
        outcome = StepOutcome(answered=len(results), lost=lost, bytes_sent=sent, bytes_up=sent,
                              bytes_down=called * self.flat.numel() * self.flat.element_size())
        if not results:
            return outcome
        grads = self.decode(torch.from_numpy(np.stack([r.grad for r in results])),
                            self.n_params)
        update = self.aggregation(grads, [r.rank for r in results], step)
        outcome.loss = float(np.mean([r.loss for r in results]))
        if update is not None:
            self.grad.copy_(clip_by_norm(update, self.cfg.optim.clip_norm))
            for group in self.optimizer.param_groups:  # the schedule: a function of the step
                group["lr"] = lr_at(self.cfg.optim, step, self.cfg.steps)
            self.optimizer.step()
            if self.has_buffers:
                self.flat[self.n_params:] = torch.from_numpy(
                    np.mean([r.buffers for r in results], axis=0))
            outcome.updated = True
        return outcome

    def state_dict(self, workers: WorkerPool | None) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "aggregation": self.aggregation.state, "rejected": self.aggregation.rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aggregation.state = state["aggregation"]
        self.aggregation.rejected = state["rejected"]

    def eval_model(self, workers: WorkerPool | None) -> torch.nn.Module:
        return self.model

    def finish(self, workers: WorkerPool | None) -> None:
        """The driver already holds the model."""

    def summary(self) -> dict[str, Any]:
        return {"rejected_updates": self.aggregation.rejected,
                "byzantine_ranks": sorted(self.aggregation.byzantine), "plane": "driver"}
