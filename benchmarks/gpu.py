"""Robust rules on the GPU against the read-once memory floor of their input (issue 17).

    python3 -m benchmarks.gpu                       # on a CUDA machine: writes gpu.md beside this
    python3 -m benchmarks.gpu --device cpu --quick  # smoke run of the same code; prints only

Each rule runs as the strategy layer defines it (`strategies.rules.build_rule`, pure torch:
this needs neither Ray nor the config, only torch), tolerating f = 1, on an n x d float32
matrix of fake gradients on the device. Its time is set against the floor: one `G.sum(0)`,
which reads every value of G once and so runs at the device's memory bandwidth. A rule at 1x
the floor costs one read of its input. (The driver plane adds a finite check before the
rule, one more read; it is not timed here.) The table also gives the bandwidth the floor
reached. Every time is the median of --reps calls after one untimed call, each ended on the
device; --rounds rounds, each a fresh matrix; the median over rounds and every round are
shown. The distance rules' Gram matrix and sign_vote's packing go in chunks sized for CPU
caches, so on a GPU their ratios include one kernel launch per chunk.

The device run for issue 17. Step 1 needs only torch, so it runs on the device image as it is:

    python3 -m benchmarks.gpu 2>&1 | tail -40; (cd benchmarks && cp gpu.md "$OUT"/)

Steps 2 and 3 need squall's own dependencies on the device: Ray, omegaconf and antlr4, and
Ray's own needs that the image lacks. They travel as wheels, and Ray's wheel (79 MB for
2.60) is over one call's 64 MiB, so it must come in two parts over two calls. Then, with
PYTHONPATH holding the wheels and the repository root:

    python3 -m pytest -q -rs tests/test_collective.py tests/test_train.py \
        tests/test_aggregators.py -k "cuda or gpu or CUDA"
    python3 -m benchmarks.dataplane --shipped --device cuda --workers 2 --rounds 3 \
        > "$OUT"/dataplane.log 2>&1; cp benchmarks/dataplane.md /tmp/dataplane-child-* "$OUT"/
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks.md_parts import invocation, write_part
from strategies.rules import build_rule, check_workers

MD = Path(__file__).with_suffix(".md")
TITLE = "squall: robust rules on the GPU against the read-once memory floor (issue 17)"
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
         "centered_clip", "sign_vote")
F = 1  # the Byzantine workers each rule tolerates
# From 320 MB up: well past the GPU's L2 (50 MB on an H100), so the floor is HBM's
SIZES = ((8, 10**7), (16, 10**7), (32, 10**7), (16, 25 * 10**6), (32, 25 * 10**6))
QUICK_SIZES = ((8, 10**5),)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median ms of `reps` calls after one untimed call, each ended on the device."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fake_gradients(n: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, d, generator=gen, device=device)


def measure_round(sizes: tuple[tuple[int, int], ...], rules: tuple[str, ...], seed: int,
                  device: torch.device, reps: int) -> dict[tuple[int, int], dict[str, float]]:
    """{(n, d): {"floor": ms, rule: ms, ...}} for one round."""
    out: dict[tuple[int, int], dict[str, float]] = {}
    for n, d in sizes:
        G = fake_gradients(n, d, seed, device)
        cell = {"floor": timed_ms(partial(torch.sum, G, 0), device, reps)}
        for rule in rules:
            if reason := check_workers(rule, n, F):
                raise ValueError(reason)
            transform = build_rule(rule)
            cell[rule] = timed_ms(partial(transform.update, G, F, transform.init()), device,
                                  reps)
            print(f"round seed {seed} n={n} d={d:.2g} {rule}: {cell[rule]:.2f} ms "
                  f"(floor {cell['floor']:.2f} ms)", flush=True)
        out[(n, d)] = cell
        del G
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def report(rounds: list[dict], rules: tuple[str, ...], device: torch.device, cmd: str,
           elapsed_s: float) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmd}` in {elapsed_s / 60:.1f} min;"
        f" device: {device_line(device)}; torch {torch.__version__}.", "",
        f"- {len(rounds)} rounds (a fresh N(0, 1) float32 matrix each), each cell the median "
        f"of its round's timed calls; the rule alone (strategies' transform), f = {F}; "
        "ratio = the rule's time / the floor's (a read of "
        "G once: `G.sum(0)`)", "",
        "| n | d | floor ms (GB/s) | " + " | ".join(f"{r} ms (x floor)" for r in rules) + " |",
        "|---" * (3 + len(rules)) + "|"]
    worst: dict[str, float] = {}
    for n, d in rounds[0]:
        cells = [r[(n, d)] for r in rounds]
        floor = statistics.median(c["floor"] for c in cells)
        gbps = n * d * 4 / (floor / 1e3) / 1e9
        row = [f"{n}", f"{d:.2g}", f"{floor:.2f} ({gbps:.0f})"]
        for rule in rules:
            ms = statistics.median(c[rule] for c in cells)
            worst[rule] = max(worst.get(rule, 0.0), ms / floor)
            every = ", ".join(f"{c[rule]:.2f}" for c in cells)
            row.append(f"{ms:.2f} ({ms / floor:.1f}x) [{every}]")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Worst ratio to the floor over the sizes: " + "; ".join(
        f"{rule} {ratio:.1f}x" for rule, ratio in worst.items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--quick", action="store_true", help="one small size, 1 round; prints only")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (--device cpu --quick runs the same code)")
    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else SIZES
    rounds_n = 1 if args.quick else args.rounds
    cmd = invocation("benchmarks.gpu")
    t0 = time.perf_counter()
    rounds = [measure_round(sizes, tuple(args.rules), seed, device, args.reps)
              for seed in range(rounds_n)]
    text = report(rounds, tuple(args.rules), device, cmd, time.perf_counter() - t0)
    print(text)
    if not args.quick:
        write_part(MD, TITLE, f"rules-{device.type}", text)
        print(f"wrote {MD}")


if __name__ == "__main__":
    main()
