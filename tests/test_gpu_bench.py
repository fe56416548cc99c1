"""benchmarks/gpu.py, the prepared device run: its table is computed from what it measured
(in-process, on CPU; the CUDA run itself needs a device)."""

from __future__ import annotations

import torch

from benchmarks.gpu import RULES, measure_round, report


def test_every_rule_runs_through_the_measurement_on_this_device() -> None:
    # n = 7: bulyan needs n >= 4f + 3 at f = 1
    cells = measure_round(((7, 2_000),), RULES, seed=0, device=torch.device("cpu"), reps=1)
    times = cells[(7, 2_000)]
    assert set(times) == {"floor", *RULES}
    assert all(ms > 0 for ms in times.values())


def test_the_table_divides_each_rule_by_the_floor_and_keeps_every_round() -> None:
    rounds = [{(4, 1_000_000): {"floor": 2.0, "median": 6.0}},
              {(4, 1_000_000): {"floor": 4.0, "median": 10.0}},
              {(4, 1_000_000): {"floor": 3.0, "median": 9.0}}]
    text = report(rounds, ("median",), torch.device("cpu"), "cmd", 1.0)
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    # medians: floor 3.0 ms over 16 MB -> 5 GB/s; median 9.0 ms, 3.0x the floor
    assert "| 3.00 (5) |" in row
    assert "9.00 (3.0x) [6.00, 10.00, 9.00]" in row
    assert text.endswith("median 3.0x")
