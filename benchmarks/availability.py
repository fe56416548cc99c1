"""Live workers on the simulated spot pool against the planner's volatile-instances model.

    python benchmarks/availability.py [--cells 0.01:0,0.01:5,0.01:10,0.03:5,0.03:10]
                                      [--seeds 0,1,2] [--steps 500] [--warmup 50] [--joins 3]

Two parts, both written into benchmarks/availability.md between `<!-- generated -->` and
`<!-- end generated -->` (the reading notes outside the markers are kept):

1. where a replacement's join time goes: on an otherwise idle simulated pool, one machine is
   reclaimed `--joins` times, and each replacement is timed from the request to the driver
   seeing its worker ready: the Ray node (`Cluster.add_node`, on the pool's helper thread),
   the worker process (its creation time), the worker's bootstrap and imports (the actor
   class unpickles orchestrator.workers: torch), the training split loaded on its node (the
   worker calls the data factory, timed inside the actor), the shard and model build, and
   the answer;
2. for each (q, d) and seed, a real `squall train cloud=simulated cloud.preempt_prob=q
   cloud.replace_delay_steps=d workers=4 model=mlp` run (the step clock waits for a
   replacement whose boot outlasts its d steps, cloud.join_wait_s): live workers per step
   after the first `--warmup` steps against the planner's E[y] = n * mean(slot_availability(
   q, steps, wait=d, start=0)) over the same steps; a cell passes when |median/E[y] - 1| <=
   5%. Each run is also compared step for step with the model played on the run's own
   draws (planner.replay_live_workers): equal in every step means the pool is the model,
   and what is left between the median and E[y] is the draws' sampling noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.md_parts import write_generated  # noqa: E402
from orchestrator.planner import replay_live_workers, slot_availability  # noqa: E402

MD = ROOT / "benchmarks" / "availability.md"
TOLERANCE = 0.05
TITLE = "Availability: the simulated spot pool against the planner"
NOTES = """## Reading notes

(Kept across reruns: only the part between the markers is regenerated.)
"""


# --------------------------------------------------------------------------- the model
def expected_live(q: float, d: int, steps: int, warmup: int, n: int) -> float:
    """The planner's E[y] per step, averaged over steps warmup+1..steps."""
    answer, _ = slot_availability(q, steps, wait=d, start=0)
    return n * float(answer[warmup:].mean())


def verdict(measured: float, expected: float) -> tuple[float, bool]:
    ratio = measured / expected if expected else float("nan")
    return ratio, abs(ratio - 1) <= TOLERANCE


# --------------------------------------------------------------------------- join timing
def time_joins(joins: int, warm: bool = False) -> list[dict]:
    """Timestamps (time.time(), seconds from the request) of `joins` replacements; `warm`:
    with cloud.warm_nodes=1, each reclaim made once the standby node and actor are up."""
    import ray

    from cloud.simulated import SimulatedPool
    from orchestrator.config import job_spec, load_config
    from orchestrator.parameter_server import ParameterServer
    from orchestrator.workers import Worker, WorkerPool
    from orchestrator.workload import data_info, resolve_workload

    class TimedWorker(Worker):
        """The real worker, with the loading of its training split timed inside __init__."""

        def __init__(self, rank, workload, *args, **kwargs):
            self.t_enter = time.time()  # a standby's: when assign() sets it up
            self.t_proc = process_created()
            self.t_data = None
            if rank is not None:
                load = workload.dataset

                def dataset(split: str):  # the worker's own call of the data factory
                    loaded = load(split)
                    if split == "train" and self.t_data is None:
                        self.t_data = time.time()
                    return loaded

                workload.dataset = dataset
            super().__init__(rank, workload, *args, **kwargs)
            self.t_built = time.time()

        def times(self) -> dict:
            return {"proc": self.t_proc, "enter": self.t_enter, "data": self.t_data,
                    "built": self.t_built}

    cfg = load_config(["cloud=simulated", "workers=1", "model=mlp", "cloud.replace_delay_s=0",
                       "log.progress=false", f"cloud.warm_nodes={int(warm)}"])
    workload = resolve_workload(cfg)
    info = data_info(workload.dataset("test"))
    training = ParameterServer(cfg, workload.model(info))
    training.actor_class = ray.remote(TimedWorker)
    pool = SimulatedPool(cfg.cloud, job_spec(cfg))
    rows = []
    try:
        machines = pool.start(1)
        workers = WorkerPool(cfg, workload, info, pool, training)  # workers load their data
        workers.start(machines)
        data_mb = sum(t.nbytes for t in workload.dataset("train").tensors) / 2**20
        for step in range(1, joins + 1):
            while warm and not standby_ready(workers):
                time.sleep(0.05)
            (_, machine), = workers.live.values()
            workers.live.clear()
            t_req = time.time()
            pool._step = step
            pool.reclaim([machine])
            node_done: dict = {}
            while True:  # the node: poll until the pool hands the machine over
                joined = pool.poll(step).joined
                for m in pool.alive.values():
                    fut = pool._adding.get(m.id)
                    if fut is not None and "cb" not in node_done:
                        node_done["cb"] = True
                        fut.add_done_callback(
                            lambda _, done=node_done: done.setdefault("t", time.time()))
                if joined:
                    break
                time.sleep(0.005)
            t_launch = time.time() - (time.monotonic() - joined[0].joined_at)
            t_node = node_done.get("t", time.time())
            workers.add(joined[0])
            while not workers.admit():
                time.sleep(0.005)
            t_ready = time.time()
            (actor, _), = workers.live.values()
            inner = ray.get(actor.times.remote())
            proc = max(inner["proc"], t_node)  # a standby's process: before the request
            rows.append({"launch": t_launch - t_req, "node": t_node - t_req,
                         "proc": proc - t_req, "enter": inner["enter"] - t_req,
                         "data": (inner["data"] or inner["enter"]) - t_req,  # a standby's:
                         "built": inner["built"] - t_req,  # loaded before the request
                         "ready": t_ready - t_req, "data_mb": data_mb})
        workers.stop()
    finally:
        pool.shutdown()
    return rows


def standby_ready(workers) -> bool:
    """Whether the pool's standby node has its standby actor up (admit() starts it)."""
    import ray

    workers.admit()
    return bool(workers.standby) and all(
        ray.get(a.ready.remote())[1] == "" for a in workers.standby.values())


def process_created() -> float:
    """time.time() at which this process was created (Linux /proc; 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def import_seconds() -> float:
    """A fresh interpreter with Ray imported: seconds to import orchestrator.workers (torch)."""
    code = ("import time, ray; t = time.perf_counter(); import orchestrator.workers; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def join_table(rows: list[dict], imports_s: float, warm: bool = False) -> str:
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    phases = [
        ("request -> machine launched (next poll)", 0.0, med["launch"]),
        ("Ray node up (`Cluster.add_node` on the helper thread)" if not warm else
         "the standby node handed over (up before the request)", med["launch"], med["node"]),
        ("node up -> worker process created" if not warm else
         "worker process (the standby actor's, up before the request)", med["node"],
         med["proc"]),
        ("process -> actor `__init__` (Ray worker bootstrap, class unpickled: imports)"
         if not warm else "the standby actor's `assign()` call reaches it", med["proc"],
         med["enter"]),
        (f"training split loaded on the node (the data factory: {med['data_mb']:.2f} MiB)"
         + (" (by the standby, before the request)" if warm else ""), med["enter"],
         med["data"]),
        ("shard, batches and model build", med["data"], med["built"]),
        ("`ready()` answer seen by the driver (admit polls)", med["built"], med["ready"]),
    ]
    lines = ["| phase | seconds (median) | share |", "| --- | ---: | ---: |"]
    for name, a, b in phases:
        lines.append(f"| {name} | {b - a:.2f} | {(b - a) / med['ready']:.0%} |")
    lines.append(f"| **request -> worker ready** | **{med['ready']:.2f}** | 100% |")
    each = ", ".join(f"{r['ready']:.2f}" for r in rows)
    lines += ["", f"Each join (s): {each}. For scale: importing `orchestrator.workers` (torch) "
              f"in a fresh interpreter with Ray already imported takes {imports_s:.2f} s."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the grid
def run_cell(q: float, d: int, seed: int, steps: int, out: Path, warm_nodes: int = 0,
             reuse: bool = False) -> dict:
    """One run of the grid (`reuse`: a finished run of the same cell in `out` is read
    instead, e.g. after an interrupted pass)."""
    name = f"q{q:g}-d{d}-s{seed}"
    if reuse and (out / name / "summary.json").exists():
        return read_cell(q, d, seed, steps, out / name, seconds=float("nan"))
    cmd = [sys.executable, "-m", "orchestrator", "train", "cloud=simulated",
           f"cloud.preempt_prob={q:g}", f"cloud.replace_delay_steps={d}", "workers=4",
           "model=mlp", f"steps={steps}", f"seed={seed}", f"run.dir={out}", f"run.name={name}",
           "log.progress=false", "eval.every=0", "checkpoint.every_steps=0",
           f"cloud.warm_nodes={warm_nodes}"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return read_cell(q, d, seed, steps, out / name, time.perf_counter() - t)


def read_cell(q: float, d: int, seed: int, steps: int, run: Path, seconds: float) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    if summary["steps_done"] != steps:
        raise SystemExit(f"{run}: {summary['steps_done']} steps, not {steps}")
    live = [json.loads(line)["live_workers"] for line in open(run / "metrics.jsonl")]
    replay = replay_live_workers(seed, q, d, 4, steps)
    return {"live": live, "replay": replay, "summary": summary, "seconds": seconds}


def grid_table(cells: dict, steps: int, warmup: int, n: int) -> str:
    lines = ["| q | d | E[y] (planner) | measured y, median | every seed | ratio | verdict | "
             "model replayed on the same draws, every seed | steps equal to the replay | "
             "joins late / joins | clock held s (median) |",
             "| ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for (q, d), runs in sorted(cells.items()):
        expected = expected_live(q, d, steps, warmup, n)
        each = [float(np.mean(r["live"][warmup:])) for r in runs]
        replayed = [float(np.mean(r["replay"][warmup:])) for r in runs]
        equal = sum(a == b for r in runs for a, b in zip(r["live"], r["replay"]))
        total = sum(max(len(r["live"]), len(r["replay"])) for r in runs)
        med = float(np.median(each))
        ratio, ok = verdict(med, expected)
        s = [r["summary"] for r in runs]
        late = sum(x.get("joins_late", 0) for x in s)
        joins = sum(x["joins"] for x in s)
        held = np.median([x.get("clock_held_s", 0.0) for x in s])
        lines.append(f"| {q:g} | {d} | {expected:.3f} | {med:.3f} | "
                     f"{', '.join(f'{e:.3f}' for e in each)} | {ratio:.3f} | "
                     f"{'pass' if ok else 'FAIL'} | {', '.join(f'{e:.3f}' for e in replayed)} | "
                     f"{equal} / {total} | {late} / {joins} | {held:.0f} |")
    return "\n".join(lines)


def grid_verdicts(cells: dict, steps: int, warmup: int, n: int) -> str:
    """The two verdicts over the whole grid, computed from the runs."""
    passed = sum(verdict(float(np.median([np.mean(r["live"][warmup:]) for r in runs])),
                         expected_live(q, d, steps, warmup, n))[1]
                 for (q, d), runs in cells.items())
    exact = sum(r["live"] == r["replay"] for runs in cells.values() for r in runs)
    runs = sum(len(v) for v in cells.values())
    return (f"- E[y] within {TOLERANCE:.0%}: {passed} of {len(cells)} cells "
            f"(**{'met' if passed == len(cells) else 'not met'}**)\n"
            f"- live workers equal to the model replayed on the run's own draws in every step: "
            f"{exact} of {runs} runs (**{'met' if exact == runs else 'not met'}**)")


# --------------------------------------------------------------------------- the file
def machine() -> str:
    import torch

    return (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="0.01:0,0.01:5,0.01:10,0.03:5,0.03:10",
                    help="q:d pairs of the grid ('': none)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--joins", type=int, default=3, help="replacements timed (0: skip)")
    ap.add_argument("--warm-nodes", type=int, default=0, help="cloud.warm_nodes of the grid")
    ap.add_argument("--out", default="/tmp/squall-availability")
    ap.add_argument("--reuse", action="store_true",
                    help="read the finished runs of a cell found in --out instead of rerunning")
    args = ap.parse_args(argv)
    grid = [(float(q), int(d)) for q, d in (c.split(":") for c in args.cells.split(",") if c)]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    command = "python benchmarks/availability.py " + " ".join(argv or sys.argv[1:])
    parts = [f"Command: `{command.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
             f"Machine: {machine()}", ""]
    if args.joins:
        imports_s = import_seconds()
        for warm in (False, True):
            rows = time_joins(args.joins, warm)
            title = "cloud.warm_nodes=1: a standby node and actor" if warm else "no standby"
            parts += [f"### Where a join's time goes: {title} ({args.joins} replacements, "
                      "idle pool, workers=1, model=mlp)", "", join_table(rows, imports_s, warm),
                      ""]
            print("\n".join(parts), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells: dict = {}
    for q, d in grid:
        for seed in seeds:
            r = run_cell(q, d, seed, args.steps, out, args.warm_nodes, args.reuse)
            cells.setdefault((q, d), []).append(r)
            print(f"q={q:g} d={d} seed={seed}: live {np.mean(r['live'][args.warmup:]):.3f} "
                  f"(E[y] {expected_live(q, d, args.steps, args.warmup, 4):.3f}, replay "
                  f"{np.mean(r['replay'][args.warmup:]):.3f}) in {r['seconds']:.0f} s",
                  flush=True)
    if cells:
        parts += [f"### Live workers vs the planner ({args.steps} steps, the first "
                  f"{args.warmup} skipped as warm-up, workers=4, model=mlp, "
                  f"cloud.warm_nodes={args.warm_nodes}, seeds "
                  f"{', '.join(map(str, seeds))}; verdict: |median/E[y] - 1| <= "
                  f"{TOLERANCE:.0%})", "", grid_table(cells, args.steps, args.warmup, 4), "",
                  grid_verdicts(cells, args.steps, args.warmup, 4)]
    write_generated(MD, TITLE, "\n".join(parts), NOTES)
    print(f"wrote {MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
