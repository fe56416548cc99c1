"""Where a squall step goes: compute vs serialization, object-store transfer, aggregation,
optimizer.

    python -m benchmarks.overhead [--steps 40] [--workers 2] [--cluster] [--quick]
    python -m benchmarks.overhead --plane collective [--workers 3] [--rounds 3] [--cluster]

Runs the step of orchestrator/parameter_server.py phase by phase with timers, on real worker
actors (a Worker subclass that times its own load / forward+backward / pack), for
resnet20 on data=fake and the digits cnn, and writes benchmarks/overhead.md. Per step (median
over the steps after 5 warm-up steps):

- driver publish: the flat parameters+buffers as a numpy array, then ray.put (one object-store
  copy, read zero-copy by every worker)
- round trip: submitting the calls until every result is back on the driver; of that, the
  slowest worker's time inside its method (load, compute, pack), and the rest: Ray's dispatch,
  argument fetch, result serialization and object-store transfer
- driver: stacking the results, the aggregation rule, and the optimizer (gradient copy-in,
  step, BatchNorm buffers)
- for scale, a no-op actor call round trip on the same workers (Ray's per-call floor here)
- the real loop: the same job run by `squall train` itself (a subprocess; eval and checkpoints
  at the end only), the median of the `step_s` it records in metrics.jsonl over the same
  steps, so the phase breakdown can be checked against what a user's run takes

With --plane collective it times the collective plane's real loop instead: `squall train
worker.plane=collective` for strategy=mean, median, krum and bulyan, each run --rounds times,
read from the phase timings the workers record in metrics.jsonl (compute_s, exchange_s,
rule_s, update_s); what step_s holds beyond them is the driver's and Ray's.

With --cluster the workers run on their own 1-CPU nodes of a local multi-node Ray cluster
(ray.cluster_utils.Cluster, as under cloud=simulated), so parameters and gradients cross
between object stores (raylet to raylet) instead of sharing one; the table goes to
benchmarks/overhead.md under its own heading.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from benchmarks.md_parts import write_part  # noqa: E402
from cloud import make_pool  # noqa: E402
from orchestrator.config import job_spec, load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402
from orchestrator.parameter_server import ParameterServer  # noqa: E402
from orchestrator.workers import GradientResult, Worker, WorkerPool  # noqa: E402
from orchestrator.workload import data_info, resolve_workload  # noqa: E402

MD = Path(__file__).with_suffix(".md")
TITLE = "squall: per-step overhead breakdown"
MODELS = {"resnet20": ["model=resnet20", "data=fake"], "cnn": ["model=cnn", "data=digits"]}


class TimedWorker(Worker):
    """The real worker; its gradient() also reports (load, compute, pack) seconds."""

    def gradient(self, state: np.ndarray, step: int) -> GradientResult:
        t0 = time.perf_counter()
        self.load(state)
        t1 = time.perf_counter()
        self.grad.zero_()
        loss = self.backward(step)
        t2 = time.perf_counter()
        result = self.pack(loss, step)
        result.timings = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return result


def job_args(model_name: str, workers: int, tmp: str) -> list[str]:
    return [*MODELS[model_name], f"workers={workers}", f"run.dir={tmp}", "log.progress=false"]


def real_loop_step_s(model_name: str, workers: int, steps: int, tmp: str,
                     cluster: bool) -> float:
    """Median step_s of `squall train` on the same job, over steps 6..steps (a fresh
    process and Ray session; with `cluster`, workers on simulated 1-CPU nodes)."""
    args = [*job_args(model_name, workers, tmp), f"steps={steps}", "eval.every=0",
            "checkpoint.every_steps=0", f"run.name=real-{model_name}",
            *(["cloud=simulated"] if cluster else [])]
    subprocess.run([sys.executable, "-m", "orchestrator", "train", *args], check=True,
                   stdout=subprocess.DEVNULL)
    rows = read_metrics(Path(tmp) / f"real-{model_name}")
    return statistics.median(r["step_s"] for r in rows if r["step"] > 5)


def measure(model_name: str, workers: int, steps: int, tmp: str) -> dict[str, float]:
    """Median seconds per step of each phase; "batch": the per-worker batch size."""
    cfg = load_config(job_args(model_name, workers, tmp))
    workload = resolve_workload(cfg)
    info = data_info(workload.dataset("test"))
    torch.manual_seed(cfg.seed)
    model = workload.model(info)
    ps = ParameterServer(cfg, model)  # the real step's state, optimizer and aggregation
    ps.actor_class = ray.remote(TimedWorker)
    state, grad, n_params = ps.flat, ps.grad, ps.n_params
    optimizer, aggregation = ps.optimizer, ps.aggregation
    pool = make_pool(cfg.cloud, job_spec(cfg))
    pool.start(cfg.workers)
    pool_workers = WorkerPool(cfg, workload, info, pool, ps)
    pool_workers.start(list(pool.alive.values()))
    actors = [actor for actor, _ in pool_workers.live.values()]

    times: dict[str, list[float]] = defaultdict(list)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        array = state.numpy()
        t1 = time.perf_counter()
        state_ref = ray.put(array)
        t2 = time.perf_counter()
        results, _ = pool_workers.gradients(state_ref, step, reclaim=[])
        t3 = time.perf_counter()
        grads = torch.from_numpy(np.stack([r.grad for r in results]))
        t4 = time.perf_counter()
        update = aggregation(grads, [r.rank for r in results], step)
        t5 = time.perf_counter()
        grad.copy_(update)
        optimizer.step()
        state[n_params:] = torch.from_numpy(np.mean([r.buffers for r in results], axis=0))
        t6 = time.perf_counter()
        t_noop = time.perf_counter()
        ray.get([a.ready.remote() for a in actors])
        t7 = time.perf_counter()
        slowest = max(results, key=lambda r: sum(r.timings))
        load, compute, pack = slowest.timings
        if step > 5:
            for key, value in [("serialize", t1 - t0), ("put", t2 - t1),
                               ("round trip", t3 - t2), ("load", load), ("compute", compute),
                               ("pack", pack), ("transfer", t3 - t2 - load - compute - pack),
                               ("stack", t4 - t3), ("aggregate", t5 - t4),
                               ("optimizer", t6 - t5), ("step", t6 - t0),
                               ("noop", t7 - t_noop)]:
                times[key].append(value)
    for actor in actors:
        ray.kill(actor)
    return {"batch": cfg.data.batch_size, **{k: statistics.median(v) for k, v in times.items()}}


ROWS = [  # (label, key, indent)
    ("driver: parameters to a flat numpy array", "serialize", ""),
    ("driver: ray.put of the parameters (object store)", "put", ""),
    ("round trip: calls out, every gradient back", "round trip", ""),
    ("worker: load parameters (one copy)", "load", "&nbsp;&nbsp;"),
    ("worker: forward + backward (compute)", "compute", "&nbsp;&nbsp;"),
    ("worker: pack gradient + buffers", "pack", "&nbsp;&nbsp;"),
    ("Ray dispatch, argument fetch, result serialization and transfer", "transfer",
     "&nbsp;&nbsp;"),
    ("driver: stack the gradients", "stack", ""),
    ("driver: aggregation rule (mean, with the NaN check)", "aggregate", ""),
    ("driver: optimizer (gradient in, SGD step, buffers)", "optimizer", ""),
    ("**whole step**", "step", ""),
    ("for scale: a no-op actor call round trip", "noop", ""),
    ("the real loop (`squall train`): step_s as recorded", "real", ""),
]


# --------------------------------------------------------------------------- collective plane
RULES = ("mean", "median", "krum", "bulyan")
PHASE_ROWS = [  # (label, metrics.jsonl key) of the collective plane's workers, per step
    ("workers: forward + backward (compute)", "compute_s"),
    ("workers: collectives (all-reduce, or all-to-all + Gram sums + all-gather), including "
     "the wait for the slowest member", "exchange_s"),
    ("workers: the rule on their block of coordinates", "rule_s"),
    ("workers: optimizer", "update_s"),
    ("driver and Ray: the rest of step_s (calls of up to 8 steps, recording, membership)",
     "driver_s"),
]


def collective_round(rule: str, workers: int, steps: int, tmp: str, cluster: bool,
                     name: str) -> dict[str, float]:
    """One `squall train worker.plane=collective` run of the CNN: the medians over steps
    6..steps of its recorded step_s and of the workers' phases (metrics.jsonl)."""
    args = [*job_args("cnn", workers, tmp), f"steps={steps}", "eval.every=0",
            "checkpoint.every_steps=0", f"run.name={name}", "worker.plane=collective",
            f"strategy={rule}", *(["cloud=simulated"] if cluster else [])]
    # Compiled kernels off: a worker compiles its (rule, n) kernel on a helper thread in its
    # first seconds, which on 2 shared cores fills most of a short run (see the notes of
    # 2026-12-07 12:20 UTC); at n = 3 the compiled median is no faster than the eager one.
    env = {**os.environ, "SQUALL_COMPILE": "0"}
    subprocess.run([sys.executable, "-m", "orchestrator", "train", *args], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    rows = [r for r in read_metrics(Path(tmp) / name) if r["step"] > 5]
    out = {key: statistics.median(r[key] for r in rows)
           for key in ("step_s", *(key for _, key in PHASE_ROWS[:-1]))}
    out["driver_s"] = statistics.median(
        r["step_s"] - sum(r[key] for _, key in PHASE_ROWS[:-1]) for r in rows)
    return out


def collective_part(workers: int, steps: int, rounds: int, cluster: bool) -> str:
    """The collective plane's real loop phase by phase, one column per rule, `rounds` runs
    each (rules interleaved per round)."""
    runs: dict[str, list[dict[str, float]]] = {rule: [] for rule in RULES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for rule in RULES:
                runs[rule].append(collective_round(rule, workers, steps, tmp, cluster,
                                                   f"{rule}-{r}"))
                print(rule, r, {k: round(v * 1e3, 2) for k, v in runs[rule][-1].items()},
                      flush=True)
    med = {rule: {key: statistics.median(run[key] for run in rs) for key in rs[0]}
           for rule, rs in runs.items()}
    lines = ["| phase | " + " | ".join(f"{rule} ms | {rule} share" for rule in RULES) + " |",
             "|---" * (1 + 2 * len(RULES)) + "|"]
    for label, key in PHASE_ROWS:
        lines.append(f"| {label} | " + " | ".join(
            f"{med[rule][key] * 1e3:.2f} | {med[rule][key] / med[rule]['step_s']:.0%}"
            for rule in RULES) + " |")
    lines.append("| **step_s as recorded** | " + " | ".join(
        f"**{med[rule]['step_s'] * 1e3:.2f}** | 100%" for rule in RULES) + " |")
    lines += ["", "Every round, step_s ms (median over its steps): " + "; ".join(
        f"{rule} " + ", ".join(f"{run['step_s'] * 1e3:.2f}" for run in rs)
        for rule, rs in runs.items())]
    flag = " --cluster" if cluster else ""
    where = ("cloud=simulated: each worker on a 1-CPU Ray node of its own" if cluster else
             "cloud=local: one Ray node")
    return "\n".join([
        f"## Collective plane, the real loop phase by phase ({where})", "",
        f"Produced by `python -m benchmarks.overhead --plane collective --steps {steps} "
        f"--workers {workers} --rounds {rounds}{flag}` from the repository root.", "",
        f"- machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f} at the end (this benchmark included), "
        f"torch {torch.__version__}, Ray {ray.__version__}",
        f"- `squall train model=cnn data=digits workers={workers} worker.plane=collective "
        f"strategy=RULE steps={steps}` (byzantine.f=0) with SQUALL_COMPILE=0 (eager rules, "
        f"no kernel compiling during the run), {rounds} runs per rule, rules "
        f"interleaved; per run the median over steps 6-{steps} of each field of its "
        "metrics.jsonl (the workers' phases are the mean over the members of a step); the "
        f"table shows the median over the {rounds} runs; shares are of step_s, so they need "
        "not add up to 100%", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int,
                        help="workers (default: 2; 3 with --plane collective, as krum and "
                        "bulyan need n >= 3)")
    parser.add_argument("--cluster", action="store_true",
                        help="workers on their own nodes of a local multi-node Ray cluster")
    parser.add_argument("--plane", choices=["driver", "collective"], default="driver",
                        help="driver: the parameter-server step re-run with timers; "
                        "collective: the real loop's own phase timings, one run per rule")
    parser.add_argument("--rounds", type=int, default=3, help="runs per rule (collective)")
    parser.add_argument("--quick", action="store_true", help="a few steps; writes no markdown")
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    args.workers = args.workers or (3 if args.plane == "collective" else 2)
    if args.plane == "collective":
        text = collective_part(args.workers, steps, 1 if args.quick else args.rounds,
                               args.cluster)
        print(text)
        if not args.quick:
            write_part(MD, TITLE, "collective-cluster" if args.cluster else "collective", text)
        return
    cluster = None
    if args.cluster:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(args.workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning")
    else:
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
                 logging_level="warning")
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in MODELS:
                results[name] = measure(name, args.workers, steps, tmp)
                print(name, {k: round(v * 1e3, 2) for k, v in results[name].items()
                             if k != "batch"}, flush=True)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:  # after the phase runs: their Ray session is gone
            results[name]["real"] = real_loop_step_s(name, args.workers, steps, tmp,
                                                     args.cluster)

    header = "| phase | " + " | ".join(f"{m} ms | {m} share" for m in MODELS) + " |"
    lines = [header, "|---" * (1 + 2 * len(MODELS)) + "|"]
    for label, key, indent in ROWS:
        cells = []
        for m in MODELS:
            ms = results[m][key] * 1e3
            share = "" if key in ("noop", "real") else \
                f"{results[m][key] / results[m]['step']:.0%}"
            cells.append(f"{ms:.2f} | {share}")
        lines.append(f"| {indent}{label} | " + " | ".join(cells) + " |")
    key = "cluster" if args.cluster else "single"
    where = ("workers on their own 1-CPU nodes of a local multi-node cluster (head node: "
             "driver only)" if args.cluster else "one Ray node: driver and workers share "
             "one object store")
    flag = " --cluster" if args.cluster else ""
    text = "\n".join([
        f"## {'Multi-node' if args.cluster else 'Single node'}: {where}", "",
        f"Produced by `python -m benchmarks.overhead --steps {steps} --workers {args.workers}"
        f"{flag}` from the repository root.", "",
        f"- machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f} at the end (this benchmark included), "
        f"torch {torch.__version__}, Ray {ray.__version__}",
        f"- {args.workers} workers (1 CPU, 1 torch thread each), batch per worker: "
        + ", ".join(f"{m} {results[m]['batch']}" for m in MODELS) + ", "
        f"strategy=mean, SGD momentum 0.9; medians over steps 6-{steps}; the worker rows are "
        "those of the slowest worker of each step; shares are of the median whole step, so "
        "they need not add up to 100%; the real loop: `squall train` on the same job in a "
        "process of its own" + (" (cloud=simulated: workers on their own nodes)"
                                if args.cluster else "") + ", its recorded step_s", "",
        *lines])
    print(text)
    if not args.quick:
        write_part(MD, TITLE, key, text)


if __name__ == "__main__":
    main()
