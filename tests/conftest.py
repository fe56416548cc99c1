"""Shared fixtures. A Ray session is started once per test module that asks for one."""

from __future__ import annotations

import os
import signal

import pytest

# Keep every Ray process of the tests on loopback: with this switch Ray takes 127.0.0.1 as the
# node address instead of the machine's routable one (set before Ray is imported; inherited by
# the subprocesses the tests start).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# Median, trimmed mean and Bulyan compile fused kernels on a helper thread
# (strategies/kernels.py): seconds of compiler work for every (rule, n, f), which would swamp
# the 2-core test machine. The suite checks the eager rules against the references, and
# tests/test_kernels.py the compiled kernels against them; the C distance kernels are checked
# by tests/test_distance_kernels.py and the `gram_path` tests of test_aggregators.py (inherited
# by `squall` subprocesses).
os.environ["SQUALL_COMPILE"] = "0"

from orchestrator.config import Config, load_config

# A suite started as a background job (`make test &`, some CI runners) inherits SIGINT ignored,
# and so would every `squall` it starts: the Ctrl-C tests need it delivered. (A Python handler
# is reset to the default in child processes; an ignored signal would stay ignored.)
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture
def make_config(tmp_path):
    """load_config with quiet, small defaults writing into tmp_path."""

    def make(*overrides: str) -> Config:
        base = [f"run.dir={tmp_path}", "log.progress=false", "eval.every=0"]
        return load_config([*base, *overrides])

    return make
