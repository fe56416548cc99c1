"""What one training step is, seen from the run frame (orchestrator/run.py).

The frame owns time: resume, membership events, metrics records, evaluation and checkpoint
timing, interruption, clean-up and the summary. A strategy family owns the steps: the
parameter server (orchestrator/parameter_server.py), the collective plane
(orchestrator/collective.py) and the gossip round (orchestrator/gossip.py) each implement
`TrainingStep`. None imports the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from cloud.pool import Machine
    from orchestrator.workers import WorkerPool


class TooFewWorkers(RuntimeError):
    """strategy.on_too_few=fail and the live workers no longer meet the rule's requirement."""


@dataclass
class StepOutcome:
    """What one step did, for the frame's record and counters."""

    answered: int  # workers whose contribution arrived this step
    loss: float | None = None  # their mean loss (None: nobody answered)
    updated: bool = False  # the model moved (False: the step was skipped)
    lost: int = 0  # workers lost (died, reclaimed, silent) during the step
    bytes_sent: int = 0  # bytes of the gradients or messages the workers sent this step
    # Every byte a worker sent (up) or received (down) this step: parameters, gradients,
    # messages (counted for each neighbour that fetches them), control traffic (e.g. Moniqua's
    # bounds); bytes_measure: traffic for measurement only (consensus distance).
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_measure: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # extra fields for metrics.jsonl


class TrainingStep(Protocol):
    """One strategy family's step. The frame calls, in order: `actor_class` / `actor_kwargs`
    (when it starts workers), `load_state_dict` (on resume), then `run` for the next steps
    (at most `steps_per_call` of them), and `state_dict` whenever it checkpoints (after
    `settle` on a stop); `eval_model` on eval steps and at the end; `finish` before the
    workers stop; `summary` for the family's summary fields."""

    actor_class: Any  # the ray.remote class the WorkerPool starts, one actor per rank
    checkpoint_before_drain: bool  # a noticed worker holds state the checkpoint must keep
    steps_per_call: int  # the most steps one `run` may be given

    def actor_kwargs(self, rank: int, workers: WorkerPool | None) -> dict[str, Any]:
        """Extra keyword arguments of a (re)starting worker of `rank`."""

    def run(self, steps: range, workers: WorkerPool, reclaim: list[Machine]
            ) -> list[StepOutcome]:
        """The steps with the live workers, one outcome each from the first on (fewer when
        the workers were cut short: the frame gives the rest again); machines in `reclaim`
        vanish while they run."""

    def settle(self, workers: WorkerPool | None) -> list[tuple[int, StepOutcome]]:
        """On a stop: (step, outcome) of the steps still in flight, finished."""

    def state_dict(self, workers: WorkerPool | None) -> dict[str, Any]:
        """Everything the step needs to go on after a resume (tensors and plain values)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of `state_dict`, before any worker starts."""

    def eval_model(self, workers: WorkerPool | None) -> torch.nn.Module:
        """The model to evaluate now (the driver's, or the average of the replicas)."""

    def finish(self, workers: WorkerPool | None) -> None:
        """Last words before the workers stop (e.g. pull the replicas' average)."""

    def summary(self) -> dict[str, Any]:
        """The family's own summary fields."""


class OneStepAtATime:
    """For a family whose every step goes through the driver (`run_step`): one step per
    call, nothing in flight between calls."""

    steps_per_call = 1

    def run(self, steps: range, workers: WorkerPool, reclaim: list[Machine]
            ) -> list[StepOutcome]:
        return [self.run_step(steps.start, workers, reclaim)]

    def run_step(self, step: int, workers: WorkerPool, reclaim: list[Machine]) -> StepOutcome:
        raise NotImplementedError

    def settle(self, workers: WorkerPool | None) -> list[tuple[int, StepOutcome]]:
        return []
