"""squall's Python entry point, for notebooks and scripts.

    from orchestrator.api import train
    summary = train(["workers=4", "steps=200", "strategy=krum", "byzantine.f=1"],
                    model=make_model, data=make_data, loss=my_loss)

The callables take the place of model.target, data.target, loss.target and eval.target
(orchestrator/workload.py has their contract) and reach the workers by cloudpickle: one
defined in the notebook or script travels by value, one of an importable module by name
(the module must then be importable on every node: the current directory on a local
cluster, ray.working_dir or ray.py_modules on a remote one). Everything else is the same
job as `squall train` with these overrides; the summary (also in summary.json) is returned.
A mistake in the configuration or the workload raises ConfigError with a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.workload import target_name

__all__ = ["ConfigError", "train"]


def train(overrides: list[str] | None = None, *,
          model: Callable[..., torch.nn.Module] | None = None,
          data: Callable[..., Any] | None = None,
          loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
          metric: Callable[[torch.nn.Module, Any], dict] | None = None) -> dict:
    """Run (or resume, with the same run.name) one training job; returns its summary."""
    given = {"model": model, "data": data, "loss": loss, "eval": metric}
    overrides = list(overrides or [])
    for part, fn in given.items():
        if fn is None:
            continue
        if not callable(fn):
            raise ConfigError(f"{part}: expected a callable, got a {type(fn).__name__}")
        overrides.append(f"{part}.target={target_name(fn)}")  # recorded in config.yaml
    cfg = load_config(overrides)
    from orchestrator.preflight import preflight
    from orchestrator.run import train as run_train

    preflight(cfg)
    return run_train(cfg, given)
