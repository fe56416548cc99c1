"""The driver's optimizer: any torch.optim class by name, a learning-rate schedule that is a
pure function of the step (so a resumed run gets exactly the rates of an uninterrupted one),
and clipping of the aggregated update by its global norm."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from conf.schema import ConfigError, opt

SCHEDULES = ("constant", "step", "cosine")


# Not for a flat model of dense gradients stepped once per update: LBFGS needs a closure that
# recomputes the loss, SparseAdam sparse gradients, Muon 2-D parameters only.
UNSUITABLE = {"lbfgs", "sparseadam", "muon"}


def optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """The optimizer classes of torch.optim by lower-case name (sgd, adam, adamw, ...)."""
    return {name.lower(): cls for name, cls in vars(torch.optim).items()
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer and name.lower() not in UNSUITABLE}


def check_optimizer(cfg: OptimConfig) -> None:
    """ConfigError when optim.name refuses lr, momentum, weight_decay or optim.args."""
    build_optimizer(cfg, [torch.zeros(2, requires_grad=True)])


class _OptimizerNames:
    """Allowed values of optim.name, read when the value is checked."""

    def names(self) -> list[str]:
        return sorted(optimizers())


@dataclass
class OptimConfig:
    name: str = field(default="sgd", metadata={
        "help": "optimizer run by the driver: any torch.optim class by name, in any case "
                "(sgd, adam, AdamW, rmsprop, ...)", "choices": _OptimizerNames(), "any_case": True})
    lr: float = opt(0.05, "learning rate (the schedule's peak)", gt=0)
    momentum: float = opt(0.9, "momentum, for optimizers that take one (sgd, rmsprop)", ge=0,
                          lt=1)
    weight_decay: float = opt(0.0, "L2 weight decay", ge=0)
    args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "further keyword arguments of the optimizer, e.g. optim.args.betas=[0.9,0.95]"})
    schedule: str = opt("constant", "learning-rate schedule after the warm-up",
                        choices=list(SCHEDULES))
    warmup_steps: int = opt(0, "linear warm-up from lr/warmup_steps to lr over these steps",
                            ge=0)
    step_size: int = opt(100, "schedule=step: multiply the rate by step_gamma every N steps",
                         ge=1)
    step_gamma: float = opt(0.1, "schedule=step: the factor", gt=0, le=1)
    clip_norm: float = opt(0.0, "clip the aggregated update to this global L2 norm (0: off)",
                           ge=0)


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (1-based) of `total_steps`."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    t = step - cfg.warmup_steps  # steps since the warm-up
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** ((t - 1) // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t - 1, span) / span))
    return cfg.lr


def build_optimizer(cfg: OptimConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """optim.name with lr, weight_decay, momentum (where the class takes it) and optim.args;
    a class that refuses them is a ConfigError naming optim.args."""
    cls = optimizers()[cfg.name.lower()]
    accepted = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = cfg.weight_decay
    if "momentum" in accepted:
        kwargs["momentum"] = cfg.momentum
    kwargs.update(cfg.args)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim.name={cfg.name} optim.args={dict(cfg.args)}: "
                          f"{str(e).splitlines()[-1]}") from None


def clip_by_norm(update: torch.Tensor, max_norm: float) -> torch.Tensor:
    """update scaled down to L2 norm max_norm when it is longer (max_norm 0: unchanged)."""
    if not max_norm:
        return update
    norm = float(torch.linalg.vector_norm(update))
    return update * (max_norm / norm) if norm > max_norm else update
