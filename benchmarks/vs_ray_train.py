"""squall (strategy=mean) side by side with Ray Train's TorchTrainer (DDP, gloo on CPU).

    python -m benchmarks.vs_ray_train [--part throughput|preemption|all] [--steps 60]
                                      [--rounds 2] [--preempt-steps 150] [--preempt-rounds 1]
                                      [--remove-at 10 25] [--replace-delay 2] [--quick]

Both sides train the same model (the workload's model target), on the same data (its data
target, the same shards: shard_of, and the same per-step batches: batch_indices), with the
same SGD settings, one CPU and one torch thread per worker, from the same Ray version. They
run alternately in one process (squall, then TorchTrainer, then the other way round), because
this machine is shared and noisy: read the ratios, not the absolute times.

- throughput: one local Ray session; steady-state samples/s over the steps after --warmup, and
  the time from the call (train() / TorchTrainer.fit()) to the end of the first step.
- preemption: a local multi-node Ray cluster (ray.cluster_utils.Cluster) whose worker nodes
  have one CPU each. A chaos thread removes the oldest worker node at fixed times after the first
  step and adds a replacement node --replace-delay seconds later; the same schedule for both.
  TorchTrainer restarts its worker group from its latest checkpoint (every 50 steps) under
  FailureConfig(max_failures); squall continues with the workers left and admits a replacement
  worker when the new node is there (cloud=local on the cluster: the pool does not own the
  nodes, the chaos thread does).

Writes its part of benchmarks/vs_ray_train.md (the other part is kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from benchmarks.md_parts import write_part  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402
from orchestrator.optimizer import build_optimizer  # noqa: E402
from orchestrator.run import train  # noqa: E402

MD = Path(__file__).with_suffix(".md")
TITLE = "squall vs Ray Train (TorchTrainer)"
MODELS = {"resnet20": ["model=resnet20", "data=fake"], "cnn": ["model=cnn", "data=digits"]}
SIDES = ["squall_collective", "squall_driver", "ray_train"]
TARGETS = {"resnet20": 1.0}  # issue 17: the collective plane vs TorchTrainer


# --------------------------------------------------------------------------- the peer
def ray_train_loop(config: dict) -> None:
    """One TorchTrainer worker: the same model, data shard, batches and SGD as a squall worker.
    Rank 0 appends 'step time' to config['log'] after every optimizer step."""
    from ray import train as rt
    from ray.train.torch import prepare_model

    from orchestrator.data import batch_indices, shard_of
    from orchestrator.workload import data_info, resolve_workload

    torch.set_num_threads(1)
    cfg = load_config(config["overrides"])
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    workload = resolve_workload(cfg)
    train_set = workload.dataset("train")
    info = data_info(workload.dataset("test"))  # as squall's driver: from the test split
    shard = torch.from_numpy(shard_of(train_set, rank, world, cfg.data, cfg.seed))
    x, y = (t[shard] for t in train_set.tensors)
    torch.manual_seed(cfg.seed)
    model = workload.model(info)
    optimizer = build_optimizer(cfg.optim, list(model.parameters()))
    start = 1
    if (checkpoint := rt.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"] + 1
    model = prepare_model(model)  # DistributedDataParallel over gloo
    log = open(config["log"], "a") if rank == 0 else None
    every = config["checkpoint_every"]
    for step in range(start, cfg.steps + 1):
        idx = torch.from_numpy(batch_indices(len(y), cfg.data.batch_size, step, cfg.seed, rank))
        optimizer.zero_grad()
        workload.loss(model, (x[idx], y[idx])).backward()
        optimizer.step()
        if log:
            log.write(f"{step} {time.time()}\n")
            log.flush()
        if every and step % every == 0 and step < cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save({"model": getattr(model, "module", model).state_dict(), "step": step,
                                "optimizer": optimizer.state_dict()}, os.path.join(d, "state.pt"))
                    ckpt = rt.Checkpoint.from_directory(d)
                rt.report({"step": step}, checkpoint=ckpt)
    rt.report({"step": cfg.steps})


def run_ray_train(overrides: list[str], workers: int, tmp: str, name: str,
                  checkpoint_every: int = 0, max_failures: int = 0) -> tuple[float, list]:
    """fit() a TorchTrainer; returns (time.time() at the call, [(step, time.time())...])."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log = os.path.join(tmp, f"{name}.steps")
    t_call = time.time()
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"overrides": overrides, "log": log,
                           "checkpoint_every": checkpoint_every},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=name, storage_path=os.path.join(tmp, "ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.fit()
    return t_call, read_step_log(log)


def read_step_log(path: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(s), float(t)) for s, t in (line.split() for line in f if line.strip())]


# --------------------------------------------------------------------------- squall
def run_squall(overrides: list[str], tmp: str, name: str) -> tuple[float, list, dict]:
    """train(); returns (time.time() at the call, [(step, time.time())...], summary)."""
    cfg = load_config(["strategy=mean", *overrides, "log.progress=false", "eval.every=0",
                       f"run.dir={tmp}", f"run.name={name}"])
    t_call = time.time()
    summary = train(cfg)
    rows = read_metrics(summary["run_dir"])
    return t_call, [(r["step"], t_call + r["wall_s"]) for r in rows], summary


# --------------------------------------------------------------------------- part 1
def steady(steps: list[tuple[int, float]], t_call: float, warmup: int, samples_per_step: int
           ) -> tuple[float, float]:
    """(samples/s after the warm-up steps, seconds from the call to the end of step 1)."""
    t = dict(steps)
    last = max(t)
    return (last - warmup) * samples_per_step / (t[last] - t[warmup]), t[1] - t_call


def throughput(args: argparse.Namespace) -> str:
    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False,
             logging_level="warning")
    runs: dict[tuple, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for model, w in [(m, w) for m in args.models for w in args.workers]:
                overrides = [*MODELS[model], f"workers={w}", f"steps={args.steps}",
                             f"data.batch_size={args.batch}", "checkpoint.every_steps=0"]
                sides = SIDES[rnd % len(SIDES):] + SIDES[:rnd % len(SIDES)]  # rotated
                for side in sides:
                    name = f"{side}-{model}-{w}-{rnd}"
                    if side == "ray_train":
                        t_call, steps = run_ray_train(overrides, w, tmp, name)
                    else:
                        t_call, steps, _ = run_squall(
                            [*overrides, f"worker.plane={side.split('_')[1]}"], tmp, name)
                    rate, first = steady(steps, t_call, args.warmup, w * args.batch)
                    runs.setdefault((model, w), {}).setdefault(side, []).append((rate, first))
                    print(f"round {rnd} {model} workers={w} {side}: {rate:.1f} samples/s, "
                          f"first step {first:.1f} s", flush=True)
    ray.shutdown()

    lines = ["| model | workers | squall samples/s (collective) | squall samples/s (driver) "
             "| TorchTrainer samples/s | ratio, collective | ratio, driver | target | "
             "squall first step s | TorchTrainer first step s | ratio |", "|---" * 11 + "|"]
    for (model, w), sides in runs.items():
        sq, dr, rt = sides["squall_collective"], sides["squall_driver"], sides["ray_train"]
        ratios = [a[0] / b[0] for a, b in zip(sq, rt)]  # per round: measured side by side
        driver = [a[0] / b[0] for a, b in zip(dr, rt)]
        first = [b[1] / a[1] for a, b in zip(sq, rt)]
        lines.append(
            f"| {model} | {w} | {med(sq, 0):.1f} | {med(dr, 0):.1f} | {med(rt, 0):.1f} | "
            f"**{statistics.median(ratios):.2f}x** ({fmt(ratios)}) | "
            f"{statistics.median(driver):.2f}x ({fmt(driver)}) | "
            f"{target_verdict(model, statistics.median(ratios))} | {med(sq, 1):.1f} | "
            f"{med(rt, 1):.1f} | {statistics.median(first):.2f}x ({fmt(first)}) |")
    cmd = (f"python -m benchmarks.vs_ray_train --part throughput --steps {args.steps} "
           f"--rounds {args.rounds}")
    return "\n".join([
        "## 1. Steady-state throughput", "",
        f"Produced by `{cmd}`; {machine()}.", "",
        f"- {args.steps} steps per run, samples/s over steps {args.warmup + 1}-{args.steps} "
        f"(batch {args.batch} per worker x workers / wall time), median of {args.rounds} "
        "rounds; the rounds alternate which side runs first",
        "- ratio = squall / TorchTrainer per round (median, then every round in brackets): "
        "above 1 squall is faster; collective: worker.plane=collective (the default for "
        "strategy=mean: the workers all-reduce among themselves), driver: worker.plane=driver "
        "(every step through the driver); the three sides run in one Ray session, their "
        "order rotated per round; first-step ratio = TorchTrainer's time / squall's "
        "(collective; above 1 squall starts faster)",
        f"- target (issue 17): the collective plane at >= {TARGETS['resnet20']}x TorchTrainer on "
        "resnet20; on the cnn the target is set against bare DDP (benchmarks/dataplane.md), "
        "shown here for scale",
        "- first step: from the call (train() / TorchTrainer.fit()) to the end of step 1, in a "
        "Ray session that is already up (squall's collective plane runs up to "
        "worker.steps_per_call=8 steps per call and records each as an even share of its "
        "call's time, the group's formation included)",
        "- resnet20 on data=fake (CIFAR-shaped 3x32x32, 4096 samples), cnn on data=digits "
        "(8x8); SGD lr 0.05 momentum 0.9; no checkpoints, no evaluation during the steps", "",
        *lines])


def target_verdict(model: str, ratio: float) -> str:
    """The collective plane's ratio against the model's target (computed, not written)."""
    if model not in TARGETS:
        return "-"
    met = ratio >= TARGETS[model]
    return f"{'met' if met else 'missed'}: {ratio:.2f}x {'>=' if met else '<'} {TARGETS[model]}x"


def med(values: list[tuple[float, float]], i: int) -> float:
    return statistics.median(v[i] for v in values)


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# --------------------------------------------------------------------------- part 2
class Chaos(threading.Thread):
    """Removes the oldest worker node at `times` seconds after the first step (when
    `first_step_file` gets its first line) and adds a replacement `delay` s after each."""

    def __init__(self, cluster: Cluster, nodes: list, first_step_file: str, times: list[float],
                 delay: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.nodes, self.file = cluster, nodes, first_step_file
        self.times, self.delay, self.done = times, delay, threading.Event()
        self.removed = 0

    def run(self) -> None:
        while not self.done.is_set() and not first_line(self.file):
            time.sleep(0.05)
        t0, events = time.monotonic(), []
        for t in self.times:
            events += [(t, "remove"), (t + self.delay, "add")]
        for t, what in sorted(events):
            if self.done.wait(max(0.0, t0 + t - time.monotonic())):
                return
            if what == "remove":
                self.cluster.remove_node(self.nodes.pop(0), allow_graceful=False)
                self.removed += 1
            else:
                self.nodes.append(self.cluster.add_node(num_cpus=1))


def first_line(path: str) -> bool:
    try:
        with open(path) as f:
            return bool(f.readline().strip())
    except FileNotFoundError:
        return False


def preemption(args: argparse.Namespace) -> str:
    # Nodes are added from the chaos thread: no SIGTERM hooks (they need the main thread); the
    # cluster is shut down explicitly instead.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0},
                      shutdown_at_exit=False)
    try:
        return run_preemption(args, cluster)
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_preemption(args: argparse.Namespace, cluster: Cluster) -> str:
    w, n = args.preempt_workers, args.preempt_steps
    nodes = [cluster.add_node(num_cpus=1) for _ in range(w)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    overrides = [*MODELS[args.preempt_model], f"workers={w}", f"steps={n}",
                 f"data.batch_size={args.batch}", "checkpoint.every_steps=50",
                 "worker.start_timeout_s=600"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.preempt_rounds):
            for side in ["squall", "ray_train"] if rnd % 2 == 0 else ["ray_train", "squall"]:
                name = f"{side}-preempt-{rnd}"
                watch = (os.path.join(tmp, name, "metrics.jsonl") if side == "squall" else
                         os.path.join(tmp, f"{name}.steps"))
                chaos = Chaos(cluster, nodes, watch, args.remove_at, args.replace_delay)
                chaos.start()
                if side == "squall":
                    t_call, steps, summary = run_squall(overrides, tmp, name)
                    note = (f"{summary['preemptions']} workers lost, {summary['joins']} joined; "
                            f"{summary['live_workers_mean']:.2f} live workers per step on "
                            "average")
                else:
                    t_call, steps = run_ray_train(overrides, w, tmp, name, checkpoint_every=50,
                                                  max_failures=len(args.remove_at) + 2)
                    note = "worker group restarted from the latest checkpoint"
                t_end = time.time()
                chaos.done.set()
                chaos.join()
                while len(nodes) < w:  # the next run starts with the full set of nodes
                    nodes.append(cluster.add_node(num_cpus=1))
                cluster.wait_for_nodes()
                first = min(t for _, t in steps)
                done = max(t for s, t in steps if s == n)
                rows.append((side, t_end - t_call, done - first, len(steps) - n, chaos.removed,
                             note))
                print(rows[-1], flush=True)

    sq = [r for r in rows if r[0] == "squall"]
    rt = [r for r in rows if r[0] == "ray_train"]
    speedup = [b[1] / a[1] for a, b in zip(sq, rt)]
    lines = ["| side | time to finish (call to return) s | first to last step s | steps redone "
             "| nodes removed | notes |", "|---" * 6 + "|"]
    for side, total, span, redone, removed, note in rows:
        label = "squall (elastic)" if side == "squall" else "TorchTrainer (checkpoint-restart)"
        lines.append(f"| {label} | {total:.1f} | {span:.1f} | {redone} | {removed} | {note} |")
    cmd = (f"python -m benchmarks.vs_ray_train --part preemption --preempt-steps {n} "
           f"--preempt-rounds {args.preempt_rounds} --remove-at "
           f"{' '.join(f'{t:g}' for t in args.remove_at)} --replace-delay {args.replace_delay:g}")
    return "\n".join([
        "## 2. Goodput under preemption", "",
        f"Produced by `{cmd}`; {machine()}.", "",
        f"- {args.preempt_model}, {w} workers (one per 1-CPU worker node of a local "
        f"ray.cluster_utils.Cluster, head node 0 CPUs), {n} steps, batch {args.batch} per "
        "worker, both sides checkpoint every 50 steps",
        f"- schedule: the oldest worker node is removed (raylet killed, no notice) "
        f"{', '.join(f'{t:g}' for t in args.remove_at)} s after the first step; a replacement "
        f"node joins {args.replace_delay:g} s after each removal",
        f"- TorchTrainer: FailureConfig(max_failures={len(args.remove_at) + 2}), Ray Train's "
        "default health-check interval; squall: cloud=local on the same cluster (the chaos "
        "thread, not squall's pool, owns the nodes), worker.step_timeout_s default; rows in "
        "the order they ran",
        f"- speed-up = TorchTrainer's time to finish / squall's, per round: {fmt(speedup)}x "
        "(target: >= 1.5x)", "",
        *lines])


# --------------------------------------------------------------------------- report
def machine() -> str:
    load = os.getloadavg()[0]
    return (f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"load average {load:.1f} at the end (this benchmark included), "
            f"torch {torch.__version__}, Ray {ray.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "preemption", "all"], default="all")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--preempt-model", default="resnet20", choices=list(MODELS))
    parser.add_argument("--preempt-workers", type=int, default=2)
    parser.add_argument("--preempt-steps", type=int, default=150)
    parser.add_argument("--preempt-rounds", type=int, default=1)
    parser.add_argument("--remove-at", nargs="+", type=float, default=[10.0, 25.0])
    parser.add_argument("--replace-delay", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no markdown")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds, args.workers = 15, 5, 1, [2]
    if args.part in ("throughput", "all"):
        text = throughput(args)
        print(text)
        if not args.quick:
            write_part(MD, TITLE, "throughput", text)
    if args.part in ("preemption", "all"):
        text = preemption(args)
        print(text)
        if not args.quick:
            write_part(MD, TITLE, "preemption", text)


if __name__ == "__main__":
    main()
