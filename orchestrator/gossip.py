"""Decentralized training: every worker owns a model replica and talks only to its neighbours.

The math of a round (the updates, the messages, Moniqua's bound theta) is in
strategies/consensus.py; this module moves the bytes. One round (`GossipRound.run`, a
`TrainingStep` of orchestrator/step.py):
  1. every live worker computes its gradient at its own model and encodes its message
     (fp32, Moniqua 1-8 bits, or CHOCO); the message stays in Ray's object store;
  2. the driver gives each worker the object refs of its neighbours' messages and its row of
     the Metropolis-Hastings mixing matrix W over the live workers; each worker fetches the
     messages itself (worker to worker, never through the driver) and mixes them in;
  3. the driver sets Moniqua's bound theta for the next round from the workers' mix stats
     (strategies.consensus.ThetaController); after a membership change or a detected
     wrap-around it measures the spread on the replicas themselves (one all-gather).
Moniqua's control traffic travels as 1-byte codes: the stats up (control_message), theta down
with the next round's call (theta_message); D-PSGD and CHOCO have none.
Membership changes (preemption, join) rebuild W over the live workers; a joining worker
starts from its saved replica, else from a live neighbour's model.

The bytes of a round (StepOutcome), at the sizes that cross the wire: bytes_up, every byte a
worker sends: its message (once, into the object store), its control stats and the replicas
the driver pulls for the algorithm (Moniqua's resync); bytes_down, every byte a worker
receives: each neighbour's message it fetched and theta; bytes_measure, the replicas pulled to
measure consensus_dist. Not counted: object references, the row of W, bookkeeping scalars
(loss, byte counts), and the pulls for evaluation, checkpoints and the end of the run
(eval_model, state_dict, finish: outside the rounds). bytes_sent: the messages only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from orchestrator.config import Config
from orchestrator.models import flatten, unflatten_into
from orchestrator.step import OneStepAtATime, StepOutcome
from orchestrator.workers import Replica
from orchestrator.workload import DataInfo, Workload
from strategies.consensus import (
    ThetaController,
    build_method,
    control_message,
    control_nbytes,
    read_control,
    theta_breached,
    theta_message,
)
from strategies.topology import gossip_weights, neighbours

if TYPE_CHECKING:
    from cloud.pool import Machine
    from orchestrator.workers import WorkerPool

log = logging.getLogger(__name__)


class GossipWorker(Replica):
    """One replica: its shard, its model as a flat vector, and its consensus state."""

    def __init__(self, rank: int | None, workload: Workload, cfg: Config, info: DataInfo,
                 device: str, byzantine: bool = False,
                 start_state: np.ndarray | None = None) -> None:
        super().__init__(rank, workload, cfg, info, device, byzantine)
        if rank is None or self.error:
            return
        self.params = list(self.model.parameters())
        self.x = torch.from_numpy(flatten(self.params)).to(self.device)
        if start_state is not None:  # a joiner starts from a live neighbour's model
            self.x = torch.as_tensor(np.array(start_state)).to(self.device)
        self.momentum = torch.zeros_like(self.x)
        self.method = build_method(cfg.strategy)
        self.consensus = self.method.init(self.x)

    def state(self) -> np.ndarray:
        return self.x.cpu().numpy()

    def reset_neighbours(self) -> None:
        """Forget per-neighbour state (CHOCO's public copies, last decodes): membership changed."""
        self.consensus = self.method.reset(self.consensus)

    def message(self, step: int, theta: np.ndarray | None) -> tuple[object, int]:
        """Gradient at the own model, then the message the neighbours will read (and its
        size in bytes, for the driver). theta: Moniqua's per-block codes (theta_message),
        None for methods without control traffic."""
        unflatten_into(self.x, self.params)
        self.model.zero_grad(set_to_none=False)
        loss = self.backward(step)
        optim = self.cfg.optim
        g = torch.cat([p.grad.reshape(-1) for p in self.params]) + optim.weight_decay * self.x
        self.momentum = optim.momentum * self.momentum + g
        self.step_vec = optim.lr * self.momentum  # the local SGD step: x - step_vec
        self.loss = loss.item()
        self.own, self.consensus = self.method.encode(self.x, self.step_vec, theta, self.cfg.seed,
                                                      step, self.rank, self.consensus)
        return self.own, self.own.nbytes

    def mix(self, refs: list, weights: dict[int, float]) -> dict:
        """Fetch the neighbours' messages (refs in the order of `weights`) and mix them in.
        A neighbour whose message is gone (its machine vanished) is left out of this round.
        Returns the loss, the sizes of the own message (`bytes`) and of the neighbours'
        messages fetched (`fetched`), and the control stats (`control`: Moniqua's, coded as
        they travel; empty for the other methods)."""
        msgs: dict[int, object] = {}
        fetched = 0
        for (j, _), ref in zip(weights.items(), refs):
            if ref is None and j != self.rank:
                continue  # that neighbour was lost before it sent
            if j == self.rank:
                msgs[j] = self.own
                continue
            try:
                msgs[j] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            fetched += msgs[j].nbytes
        self.x, self.consensus, stats = self.method.mix(self.x, self.step_vec, msgs, weights,
                                                        self.rank, self.consensus)
        control = control_message(stats) if self.method.control else {}
        return {"loss": self.loss, "bytes": self.own.nbytes, "fetched": fetched,
                "control": control}


RemoteGossipWorker = ray.remote(GossipWorker)


class GossipRound(OneStepAtATime):
    """The gossip family's `TrainingStep`: one round per step over the live workers.

    cfg: the run's configuration; model: the driver's copy of the model (built like the
    workers', after torch.manual_seed(cfg.seed)), which holds the replicas' average for
    evaluation, at the end, and when nobody is live. `state_dict` holds the average, every
    live replica (checkpoint.replicas=all), the wrap count and the theta controller's state.
    """

    actor_class = RemoteGossipWorker
    checkpoint_before_drain = True  # a noticed worker's replica goes with its machine

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        self.cfg, self.model = cfg, model
        self.params = list(model.parameters())
        self.control = build_method(cfg.strategy).control  # Moniqua: theta and its stats
        self.controller = ThetaController(cfg.strategy.theta_margin, cfg.strategy.block_size)
        self.theta_state = self.controller.init()
        self.replicas: dict[int, np.ndarray] = {}  # saved replicas of ranks not restarted yet
        self.saved_average: np.ndarray | None = None  # a resumed run's average
        self.members: list[int] | None = None  # the live ranks W was built over
        self.wraps = 0
        self.theta_breaches = 0  # measurements that found neighbours further apart than theta

    def actor_kwargs(self, rank: int, workers: WorkerPool | None) -> dict[str, Any]:
        """A (re)starting worker begins from its saved replica, else from a live one's model,
        else (nobody live) from the resumed run's average."""
        if rank in self.replicas:
            return {"start_state": self.replicas.pop(rank)}
        if workers is not None and workers.live:
            actor, _ = next(iter(workers.live.values()))
            return {"start_state": actor.state.remote()}
        return {"start_state": self.saved_average}

    def run_step(self, step: int, workers: WorkerPool, reclaim: list[Machine]) -> StepOutcome:
        """One round: messages, mixing, the next theta; metrics theta (Moniqua), wraps (so far)
        and, every strategy.consensus_every steps, consensus_dist (mean ||x_i - x_bar||); the
        bytes of the round (module docstring)."""
        st = self.cfg.strategy
        lost, pulled = self._membership(step, workers)
        theta = (theta_message(self.theta_state.theta, st.bits, st.rounding) if self.control
                 else None)
        called = len(workers.live)  # each of them receives theta
        messages, lost_sending = workers.call("message", (step, theta), reclaim=reclaim,
                                              payload=True)
        # W over the round's members: a worker lost during this round leaves a gap (its
        # weight stays home) rather than new neighbour pairs that theta was not set for.
        live = sorted(messages)
        weights = {r: gossip_weights(self.members, st.topology, r, step) for r in live}
        mix_args = {r: ([messages[j][0] if j in messages else None for j in weights[r]],
                        weights[r]) for r in live}
        stats, lost_mixing = workers.call("mix", mix_args) if live else ({}, 0)
        outcome = StepOutcome(answered=len(stats), updated=bool(stats),
                              lost=lost + lost_sending + lost_mixing)
        outcome.bytes_up = pulled + sum(info for _, info in messages.values())
        outcome.bytes_down = 0 if theta is None else called * theta.nbytes
        if stats:
            rows = list(stats.values())
            outcome.bytes_down += sum(s["fetched"] for s in rows)
            outcome.bytes_up += sum(control_nbytes(s["control"]) for s in rows)
            if self.control:
                control = [read_control(s["control"]) for s in rows]
                self.wraps += sum(c["wraps"] for c in control)
                _, self.theta_state, resync = self.controller.update(
                    self.theta_state, control, live, st.topology, step)
                if resync and workers.live:
                    outcome.bytes_up += self._resync(step, workers)
            outcome.loss = float(np.mean([s["loss"] for s in rows]))
            outcome.bytes_sent = sum(s["bytes"] for s in rows)
        outcome.metrics = {"wraps": self.wraps}
        if self.control:
            outcome.metrics["theta"] = float(self.theta_state.theta.max())
        if (step % st.consensus_every == 0 or step == self.cfg.steps) and workers.live:
            avg, states = self._average(workers)  # measurement only, not the algorithm's
            outcome.bytes_measure = sum(s.nbytes for s in states.values())
            outcome.metrics["consensus_dist"] = float(np.mean(
                [np.linalg.norm(s - avg) for s in states.values()] or [0.0]))
            if self.control:
                self._check_theta(states, step)
                outcome.metrics["theta_breaches"] = self.theta_breaches
        return outcome

    def _check_theta(self, states: dict[int, np.ndarray], step: int) -> None:
        """Count a measurement whose replicas break the bound of the next round's messages
        (strategies.consensus.theta_breached), and say so once: the decodes are no longer
        guaranteed, and a wrap the workers cannot see would pass silently."""
        st = self.cfg.strategy
        ranks = self.members  # W's positions, in order
        pairs = [(ranks[i], ranks[j])  # each edge of the next round's graph once
                 for i, js in enumerate(neighbours(st.topology, len(ranks), step + 1))
                 for j in js if i < j]
        if not theta_breached(self.theta_state.theta, states, pairs, st.bits, st.rounding,
                              st.block_size):
            return
        self.theta_breaches += 1
        if self.theta_breaches == 1:
            log.warning("step %d: neighbouring replicas differ by more than Moniqua's theta "
                        "(%d bits): decodes may wrap unseen; theta_breaches in metrics.jsonl "
                        "counts the measurements that found this (more bits or a larger "
                        "strategy.theta_margin widen the bound)", step, st.bits)

    def _membership(self, step: int, workers: WorkerPool) -> tuple[int, int]:
        """After a membership change: rebuild W, reset the workers' neighbour state and (Moniqua)
        measure theta on the replicas. Returns the workers lost meanwhile and the bytes of the
        replicas pulled."""
        if self.members is None:  # the first round: the workers just started
            self.members = sorted(workers.live)
        if sorted(workers.live) == self.members:
            return 0, 0
        self.members = sorted(workers.live)
        _, lost = workers.call("reset_neighbours", ())
        if (self.control and workers.live
                and self.controller.can_resync(self.theta_state)):  # new neighbour pairs
            return lost, self._resync(step, workers)
        return lost, 0

    def _resync(self, step: int, workers: WorkerPool) -> int:
        """theta measured on the replicas themselves (one all-gather through the driver).
        Returns the bytes of the replicas pulled (the algorithm's traffic: bytes_up)."""
        states = self._average(workers)[1]
        self.theta_state = self.controller.resync(self.theta_state, states, step)
        return sum(s.nbytes for s in states.values())

    def _average(self, workers: WorkerPool | None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The mean of the live replicas, and each of them (a worker that just died is left
        out here; the next round drops it). Nobody live: the driver's model."""
        refs = {rank: actor.state.remote()
                for rank, (actor, _) in (workers.live.items() if workers is not None else ())}
        states = {}
        for rank, ref in refs.items():
            try:
                states[rank] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        if not states:
            return flatten(self.params), states
        return np.mean(list(states.values()), axis=0), states

    def state_dict(self, workers: WorkerPool | None) -> dict[str, Any] | None:
        """The average, the live replicas (checkpoint.replicas=all), the wrap count and the
        theta controller's state; None when no replica is live (nothing to save)."""
        avg, states = self._average(workers)
        if not states:
            return None
        keep = self.cfg.checkpoint.replicas == "all"
        return {"average": torch.from_numpy(avg), "wraps": self.wraps,
                "theta_breaches": self.theta_breaches,
                "replicas": {str(rank): torch.tensor(s) for rank, s in states.items()}  # s:
                if keep else {},  # read-only (Ray): torch.tensor copies it
                **self.controller.state_dict(self.theta_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replicas = {int(r): v.numpy() for r, v in state["replicas"].items()}
        self.saved_average = state["average"].numpy()
        unflatten_into(state["average"], self.params)
        self.theta_state = self.controller.load_state_dict(state)
        self.wraps = int(state.get("wraps", 0))
        self.theta_breaches = int(state.get("theta_breaches", 0))

    def eval_model(self, workers: WorkerPool | None) -> torch.nn.Module | None:
        """The driver's model holding the average of the live replicas (workers=None: the
        average last pulled); None when no replica is live."""
        if workers is None:
            return self.model
        if not workers.live:
            return None
        self.finish(workers)
        return self.model

    def finish(self, workers: WorkerPool | None) -> None:
        """Pull the replicas' average into the driver's model before the workers stop."""
        if workers is not None and workers.live:
            unflatten_into(self._average(workers)[0], self.params)

    def summary(self) -> dict[str, Any]:
        return {"wraps": self.wraps, "final_theta": float(self.theta_state.theta.max())
                if self.control else None,
                "theta_breaches": self.theta_breaches if self.control else None,
                "rejected_updates": 0, "byzantine_ranks": []}
