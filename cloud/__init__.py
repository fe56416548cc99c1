"""Spot pools: where workers run, what it costs, and who is about to be reclaimed.

Each pool takes only its own config slice (cloud/config.py) and the JobSpec; nothing here
imports orchestrator/. Ray is imported only with the pools themselves (cloud.pool), so the
configuration classes load without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloud.config import CloudConfig, JobSpec

if TYPE_CHECKING:
    from cloud.pool import Machine, PollResult, Pool, StaticPool


def make_pool(cloud: CloudConfig, job: JobSpec) -> Pool:
    """The pool named by cloud.name (the options are cloud.config.CLOUDS)."""
    if cloud.name == "simulated":
        from cloud.simulated import SimulatedPool

        return SimulatedPool(cloud, job)
    if cloud.name == "aws":
        from cloud.aws import AwsPool

        return AwsPool(cloud, job)
    from cloud.pool import Pool, StaticPool

    return StaticPool(cloud, job) if cloud.name == "static" else Pool(cloud, job)


def __getattr__(name: str):  # the pool classes, imported (with Ray) on first use
    if name in ("Machine", "PollResult", "Pool", "StaticPool"):
        import cloud.pool

        return getattr(cloud.pool, name)
    raise AttributeError(f"module 'cloud' has no attribute {name!r}")


__all__ = ["CloudConfig", "JobSpec", "Machine", "PollResult", "Pool", "StaticPool", "make_pool"]
