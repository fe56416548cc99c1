"""The driver's half of a step: from the gradients that arrived to one update direction.

In order: simulated Byzantine workers replace their rows (omniscient attacks see the honest
gradients of the step: this is the one place where that happens), non-finite rows are
rejected, the rule's requirement is checked against the rows left, pre-aggregation runs, then
the rule. The math lives in strategies/; this file only wires it to the configuration.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from orchestrator.config import Config
from strategies.aggregators import check_workers, get_aggregator
from strategies.attacks import byzantine_ranks, get_attack
from strategies.preaggregation import apply_preaggregation

log = logging.getLogger(__name__)


class TooFewWorkers(RuntimeError):
    """strategy.on_too_few=fail and the live workers no longer meet the rule's requirement."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """Randomness of one step (attacks, bucketing): a function of (seed, step) alone, so a
    resumed run draws exactly what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Aggregation:
    def __init__(self, cfg: Config) -> None:
        self.cfg, st, byz = cfg, cfg.strategy, cfg.byzantine
        self.rule = get_aggregator(st.name)
        self.f = byz.f if st.f is None else st.f
        self.byzantine = set(byzantine_ranks(cfg.workers, byz.f, cfg.seed))
        self.attack = get_attack(byz.attack) if byz.f else None
        self.attack_params = {"gaussian": {"std": byz.std}, "ipm": {"eps": byz.eps},
                              "alie": {"z": byz.z}, "bulyan_coord": {"scale": byz.scale}
                              }.get(byz.attack, {})
        self.prev: Tensor | None = None  # centered_clip starts from the previous aggregate
        self.rejected = 0  # non-finite gradients kept away from the model
        self._warned_too_few = False

    def is_byzantine(self, rank: int) -> bool:
        return rank in self.byzantine

    def __call__(self, grads: Tensor, ranks: list[int], step: int) -> Tensor | None:
        """The update direction from one row per rank, or None when the step is skipped."""
        gen = step_generator(self.cfg.seed, step)
        grads = self._inject_attack(grads, ranks, gen)

        # Non-finite rows are dropped and counted as identified faulty inputs: at most f - k
        # of the rows left can be Byzantine.
        # A row is finite iff its sum is, unless the sum overflowed: such rows are checked
        # value by value. (30x cheaper than isfinite(grads).all(1), which writes a bool copy.)
        finite = torch.isfinite(grads.sum(dim=1))
        for row in (~finite).nonzero().flatten().tolist():
            finite[row] = bool(torch.isfinite(grads[row]).all())
        rejected = int((~finite).sum())
        self.rejected += rejected
        if rejected:
            grads = grads[finite]
        f = max(self.f - rejected, 0)

        st = self.cfg.strategy
        n = -(-len(grads) // st.bucket_size) if "bucketing" in st.pre else len(grads)
        if reason := check_workers(st.name, n, f):
            if st.on_too_few == "fail":
                raise TooFewWorkers(f"step {step}: {reason} (strategy.on_too_few=fail)")
            if not self._warned_too_few:
                log.warning("step %d: %s; skipping such steps (strategy.on_too_few=skip)",
                            step, reason)
                self._warned_too_few = True
            return None

        grads = apply_preaggregation(st.pre, grads, f, st.bucket_size, gen)
        update = self.rule.fn(grads, f, **self._rule_params(len(grads), f))
        if st.name == "centered_clip":
            self.prev = update
        return update

    def _rule_params(self, n: int, f: int) -> dict:
        st = self.cfg.strategy
        if st.name == "multi_krum":
            return {"m": min(st.m, n - f) if st.m else None}
        if st.name == "centered_clip":
            return {"prev": self.prev, "tau": st.tau, "iters": st.iters}
        if st.name == "geomed":
            return {"tol": st.tol}
        return {}

    def _inject_attack(self, grads: Tensor, ranks: list[int], gen: torch.Generator) -> Tensor:
        """Rows of Byzantine ranks become the attack's output, computed from the honest rows."""
        rows = [i for i, r in enumerate(ranks) if r in self.byzantine]
        honest = [i for i, r in enumerate(ranks) if r not in self.byzantine]
        if self.attack is None or self.attack.data_side or not rows or not honest:
            return grads
        forged = self.attack.fn(grads[honest], len(rows), len(ranks), gen, **self.attack_params)
        if self.cfg.strategy.name == "sign_vote":
            forged = torch.sign(forged)  # the message is still one bit per coordinate
        grads = grads.clone()
        grads[rows] = forged.to(grads.dtype)
        return grads
