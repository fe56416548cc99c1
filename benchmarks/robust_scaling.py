"""Robust aggregation scaling (issue 17): a rule on the driver against the same rule sharded
by blocks of coordinates across the workers, with fake gradients.

    python -m benchmarks.robust_scaling                       # full run, writes the .md part
    python -m benchmarks.robust_scaling --quick               # smoke run: prints only
    python -m benchmarks.robust_scaling --n 4 8 --d 1e5 1e6 --rules median --rounds 3

Per round, rule, n and d, the same n fake gradients (float32, N(0, 1), seeded):

- driver: the driver plane's aggregation (`orchestrator.parameter_server.Aggregation`, what
  `squall train worker.plane=driver` runs each step) on the (n, d) matrix in one process,
  compute only: the n gradients' way to the driver is not in this time (on the driver plane
  it comes on top); the busiest process is the driver, which takes in n gradients and hands
  the parameters to n workers: 2 n d floats per step.
- sharded: n processes in a gloo group (torch.multiprocessing, one torch thread each; on this
  2-core machine they share the cores), each holding its own gradient, run the collective
  plane's step (`orchestrator.collective.sharded_update` with the same `Aggregation` on
  the block, finite flags agreed by all-reduce): all-to-all, the rule on d/n coordinates,
  all-gather. Time: from a barrier to a barrier (the slowest member). Busiest process: every
  member sends and receives 2 (n - 1) / n of a gradient, plus n flags: about 4 d floats up
  and down together, whatever n.

`measured on loopback`: the bytes the interface sent during the timed steps (from
/proc/net/dev, every member's gloo traffic with its TCP framing) over the steps and the
members: what one member sent per step, against the MB/step column's sent + received.

`same update`: the sharded update gathered on rank 0 equals the driver's on the same matrix:
bit for bit for the order statistics and Krum (a selection); for the geometric median, whose
weights come from a Gram matrix the members sum over their blocks (one all-reduce of n x n
float64 per pass, on top of the volume above), within 10x its Weiszfeld tolerance:
||sharded - driver|| <= 1e-5 ||driver|| (the largest such ratio is shown). A Gram matrix
summed in another order can stop the iterations one step apart, each step under 1e-6.
Compiled kernels are off on both sides (SQUALL_COMPILE=0), so both run the same eager rule.
At least 3 rounds; medians and every round are shown. Writes the `scaling` block of
benchmarks/robust_scaling.md (the dated notes below it are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ["SQUALL_COMPILE"] = "0"  # eager rules on both sides (inherited by the members)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.md_parts import invocation, write_part  # noqa: E402
from orchestrator.collective import agreed_rows, sharded_update  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.parameter_server import Aggregation  # noqa: E402

MD = Path(__file__).with_suffix(".md")
TITLE = "squall: robust aggregation on the driver vs sharded across the workers (issue 17)"
STEP = 1  # the step number the aggregation sees (its randomness: none for these rules)
BITWISE = ("median", "trimmed_mean", "krum", "bulyan")  # else: weights from a summed Gram
WEISZFELD_SLACK = 1e-5  # 10x geomed's default tolerance (strategy.tol = 1e-6)


def aggregation(rule: str, n: int) -> Aggregation:
    """What both planes build for `strategy=rule` with n workers, tolerating f = 1."""
    return Aggregation(load_config([f"workers={n}", f"strategy={rule}", "strategy.f=1"]))


def fake_gradient(rnd: int, rank: int, d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(rnd * 1_000 + rank))


def timed_ms(fn, reps: int) -> tuple[float, object]:
    """Median ms of `reps` calls, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


# --------------------------------------------------------------------------- sharded members
def member(rank: int, n: int, port: int, cases: list[tuple[str, int]], rnd: int, reps: int,
           results: dict) -> None:
    """One member of the group: every (rule, d) case, timed barrier to barrier."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n)
    for rule, d in cases:
        step = member_step(aggregation(rule, n), fake_gradient(rnd, rank, d), list(range(n)),
                           rank)
        step()  # once untimed (first-call set-up)
        sent0 = loopback_bytes()
        ms, update = timed_ms(step, reps)
        wire = (loopback_bytes() - sent0) / reps  # every member's bytes, one step
        if rank == 0:
            results[(rule, d)] = (ms, update, wire / n)
    dist.destroy_process_group()


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (/proc/net/dev): the members' traffic,
    and whatever else uses it (the machine is otherwise idle for this benchmark)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])  # transmit bytes
    return 0


def member_step(agg: Aggregation, grad: torch.Tensor, members: list[int], rank: int):
    """One sharded step of this member, from a barrier to a barrier."""

    def step() -> torch.Tensor | None:
        dist.barrier()
        out = sharded_update(grad, members, rank,
                             lambda block: agg(block, members, STEP, agree=agreed_rows))
        dist.barrier()
        return out

    return step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sharded(n: int, cases: list[tuple[str, int]], rnd: int, reps: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(member, args=(n, free_port(), cases, rnd, reps, results), nprocs=n)
        return dict(results)


# --------------------------------------------------------------------------- the driver
def run_driver(rule: str, n: int, d: int, rnd: int, reps: int) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(os.cpu_count() or 1)  # the driver has the machine
    G = torch.stack([fake_gradient(rnd, rank, d) for rank in range(n)])
    agg = aggregation(rule, n)
    return timed_ms(lambda: agg(G, list(range(n)), STEP), reps)


# --------------------------------------------------------------------------- measuring
def measure(args: argparse.Namespace) -> dict:
    """(rule, n, d) -> per round (driver ms, sharded ms, difference, bytes on the wire)."""
    cases = [(rule, int(d)) for rule in args.rules for d in args.d]
    rows: dict = {}
    for rnd in range(args.rounds):
        for n in args.n:
            sharded = run_sharded(n, cases, rnd, args.reps)
            for rule, d in cases:
                driver_ms, expected = run_driver(rule, n, d, rnd, args.reps)
                sharded_ms, update, wire = sharded[(rule, d)]
                same = difference(rule, update, expected)
                rows.setdefault((rule, n, d), []).append((driver_ms, sharded_ms, same, wire))
                print(f"round {rnd + 1} {rule} n={n} d={d:.2g}: driver {driver_ms:.1f} ms, "
                      f"sharded {sharded_ms:.1f} ms, difference {same:.1e}", file=sys.stderr,
                      flush=True)
    return rows


# --------------------------------------------------------------------------- report
def difference(rule: str, update: torch.Tensor | None, expected: torch.Tensor) -> float:
    """0 when the sharded update is the driver's (bitwise rules: the same bits), else
    ||update - expected|| / ||expected|| (inf: different bits, or no update)."""
    if update is None or (rule in BITWISE and not torch.equal(update, expected)):
        return float("inf")
    return 0.0 if rule in BITWISE else float((update - expected).norm() / expected.norm())


def agrees(diff: float) -> bool:
    return diff <= WEISZFELD_SLACK


def busiest_mb(rule: str, n: int, d: int) -> tuple[float, float]:
    """MB through the busiest process per step (sent + received): the driver's 2 n d
    floats; a member's all-to-all and all-gather, 4 (n - 1) blocks of ceil(d / n), the
    all-reduce of n int32 flags and, for the distance rules, of one m x m float64 Gram
    matrix (m = n, and n + 1 for the geometric median's origin row; one pass for these
    zero-mean gradients), each 2 (n - 1) / n of it each way."""
    width = -(-d // n)
    m = {"krum": n, "geomed": n + 1}.get(rule, 0)
    member_bytes = 4 * (n - 1) * width * 4 + 2 * 2 * (n - 1) * 4 + 2 * 2 * (n - 1) * m * m * 8 / n
    return 2 * n * d * 4 / 1e6, member_bytes / 1e6


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def table(rows: dict) -> tuple[list[str], list[str]]:
    lines = ["| rule | n | d | driver ms (median) | every round | sharded ms (median) | every "
             "round | driver / sharded | busiest process MB/step: driver | sharded | sharded, "
             "measured on loopback (sent per member) | same update |", "|---" * 12 + "|"]
    per_float = []  # the sharded busiest process's bytes over 4 d, for the verdict
    for (rule, n, d), rounds in sorted(rows.items()):
        driver = [r[0] for r in rounds]
        sharded = [r[1] for r in rounds]
        drv_mb, mem_mb = busiest_mb(rule, n, d)
        per_float.append(mem_mb * 1e6 / (4 * d))
        worst = max(r[2] for r in rounds)
        same = ("yes" if worst == 0 else f"yes ({worst:.1e})") if agrees(worst) else \
            f"NO ({worst:.1e})"
        lines.append(f"| {rule} | {n} | {d:.2g} | {statistics.median(driver):.1f} | "
                     f"{fmt(driver)} | {statistics.median(sharded):.1f} | {fmt(sharded)} | "
                     f"{statistics.median(driver) / statistics.median(sharded):.2f}x | "
                     f"{drv_mb:.1f} | {mem_mb:.1f} | "
                     f"{statistics.median(r[3] for r in rounds) / 1e6:.1f} | {same} |")
    worst = max(per_float)
    verdicts = [
        f"- busiest process, sharded: at most {worst:.2f} x d floats per step over every n "
        f"and d measured ({'O(d): met' if worst <= 4.01 else 'grows with n: missed'}; the "
        "driver plane's busiest process moves 2 n d)",
        "- every sharded update equal to the driver's: "
        + ("yes" if all(agrees(r[2]) for rs in rows.values() for r in rs) else "NO")
        + " (bit for bit, the geometric median within 1e-5 in norm)"]
    return lines, verdicts


def report(args: argparse.Namespace, rows: dict, elapsed_s: float) -> str:
    lines, verdicts = table(rows)
    cmd = invocation("benchmarks.robust_scaling")
    return "\n".join([
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmd}` in {elapsed_s / 60:.1f} "
        f"min; machine: {os.cpu_count()} cores ({platform.machine()}), torch "
        f"{torch.__version__}; load average at the end {os.getloadavg()[0]:.1f}.", "",
        f"- {args.rounds} rounds, each the median of {args.reps} timed steps; fake gradients "
        "N(0, 1) float32, f = 1; compiled kernels off on both sides",
        "- driver: the rule's compute alone, in one process with every core (the gradients' "
        "transfer to it not counted); sharded: the whole exchange and rule, n processes with "
        "one thread each, "
        f"sharing the {os.cpu_count()} cores (with n above the core count the sharded time "
        "includes waiting for a core: on n machines the members compute at once)", "",
        *lines, "", *verdicts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", nargs="+", default=["median", "trimmed_mean", "krum", "geomed"])
    p.add_argument("--n", nargs="+", type=int, default=[5, 8, 16])  # krum: n >= 2f + 3
    p.add_argument("--d", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="n 5, d 1e5, 1 round; prints only")
    p.add_argument("--part", default="scaling", help="the block of the .md it writes (another "
                   "name adds a block beside the default grid's)")
    args = p.parse_args()
    if args.quick:
        args.n, args.d, args.rounds, args.rules = [5], [1e5], 1, ["median"]
    t0 = time.perf_counter()
    text = report(args, measure(args), time.perf_counter() - t0)
    print(text)
    if not args.quick:
        write_part(MD, TITLE, args.part, text)
        print(f"wrote {MD}")


if __name__ == "__main__":
    main()
