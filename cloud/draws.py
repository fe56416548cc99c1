"""The simulated pool's preemption draws (plain Python, no Ray): the planner replays them."""

from __future__ import annotations

import random


def spot_rng(seed: int, step: int) -> random.Random:
    """Per-step preemption draws that depend only on (seed, step)."""
    return random.Random(seed * 1_000_003 + step)
