"""Spot price traces in the column layout of EC2's spot price history, and a synthetic one.

A trace CSV has a header with (at least) the columns of `describe-spot-price-history`:
Timestamp, AvailabilityZone, InstanceType, ProductDescription, SpotPrice. Prices are $/hour
and hold from their timestamp until the next row of the same instance type.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

COLUMNS = ["Timestamp", "AvailabilityZone", "InstanceType", "ProductDescription", "SpotPrice"]


class TraceError(ValueError):
    """A trace file that cannot be used; one-line message."""


@dataclass
class PriceTrace:
    """A step function of price over trace time (seconds from the first row)."""

    times: list[float]
    prices: list[float]
    instance_type: str

    def price_at(self, t: float) -> float:
        """Price at trace time t (the first price before the start, the last after the end)."""
        i = bisect.bisect_right(self.times, t) - 1
        return self.prices[max(i, 0)]

    def next_change_above(self, t: float, bid: float) -> float | None:
        """The first trace time after t at which the price rises above bid, if any."""
        i = bisect.bisect_right(self.times, t)
        for j in range(i, len(self.times)):
            if self.prices[j] > bid:
                return self.times[j]
        return None

    @property
    def duration(self) -> float:
        return self.times[-1]


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def load_trace(path: str, instance_type: str = "") -> PriceTrace:
    """Read a spot price history CSV; keep one instance type (default: the first one listed)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise TraceError(f"cloud.trace={path}: cannot read it ({e.strerror})") from None
    missing = [c for c in ("Timestamp", "InstanceType", "SpotPrice") if rows and c not in rows[0]]
    if not rows or missing:
        raise TraceError(f"cloud.trace={path}: expected a CSV with columns {', '.join(COLUMNS)}")
    wanted = instance_type or rows[0]["InstanceType"]
    points = sorted((_parse_time(r["Timestamp"]), float(r["SpotPrice"]))
                    for r in rows if r["InstanceType"] == wanted)
    if not points:
        types = sorted({r["InstanceType"] for r in rows})
        raise TraceError(f"cloud.instance_type={wanted}: not in {path}; valid: {', '.join(types)}")
    start = points[0][0]
    return PriceTrace([(t - start).total_seconds() for t, _ in points], [p for _, p in points],
                      wanted)


def synthetic_trace(hours: float = 24.0, base: float = 0.1, on_demand: float = 0.4,
                    spikes_per_day: float = 6.0, step_minutes: float = 5.0, seed: int = 0,
                    instance_type: str = "m5.large", zone: str = "us-east-1a") -> list[dict]:
    """Rows of a plausible spot price history: a mean-reverting walk around `base` with
    occasional spikes towards (and sometimes above) the on-demand price."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    steps = max(2, int(hours * 60 / step_minutes))
    spike_p = spikes_per_day * step_minutes / (24 * 60)
    price, spike_left, rows = base, 0, []
    for i in range(steps):
        if spike_left == 0 and rng.random() < spike_p:
            spike_left = rng.randint(1, 6)  # 5-30 minutes
        if spike_left:
            spike_left -= 1
            target = on_demand * rng.uniform(0.7, 1.3)
        else:
            target = base
        price = max(0.2 * base, price + 0.5 * (target - price) + rng.gauss(0, 0.03 * base))
        rows.append({"Timestamp": (start + timedelta(minutes=i * step_minutes)).isoformat(),
                     "AvailabilityZone": zone, "InstanceType": instance_type,
                     "ProductDescription": "Linux/UNIX", "SpotPrice": f"{price:.4f}"})
    return rows


def write_trace(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def availability(trace: PriceTrace, bid: float, samples: int = 10_000) -> float:
    """Fraction of trace time during which the price is <= bid (the spot CDF at bid)."""
    if trace.duration <= 0:
        return float(trace.prices[0] <= bid)
    ts = (trace.duration * (i + 0.5) / samples for i in range(samples))
    return sum(trace.price_at(t) <= bid for t in ts) / samples


def is_finite_price(value: float) -> bool:
    return math.isfinite(value) and value >= 0
