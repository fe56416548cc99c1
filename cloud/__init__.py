"""Spot pools: where workers run, what it costs, and who is about to be reclaimed."""

from __future__ import annotations

from cloud.pool import Machine, PollResult, Pool, StaticPool
from orchestrator.config import Config


def make_pool(cfg: Config) -> Pool:
    """The pool named by cloud.name (the options are the files in conf/cloud/)."""
    if cfg.cloud.name == "simulated":
        from cloud.simulated import SimulatedPool

        return SimulatedPool(cfg)
    if cfg.cloud.name == "static":
        return StaticPool(cfg)
    if cfg.cloud.name == "aws":
        from cloud.aws import AwsPool

        return AwsPool(cfg)
    return Pool(cfg)


__all__ = ["Machine", "PollResult", "Pool", "StaticPool", "make_pool"]
