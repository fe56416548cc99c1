"""Byzantine robustness: final test accuracy of every aggregation rule under every attack.

    .venv/bin/python -m benchmarks.robustness            # full run, writes robustness.md
    .venv/bin/python -m benchmarks.robustness --quick    # tiny smoke run, prints only

Each cell is one real `orchestrator.run.train` run (11 worker actors on one local Ray session,
started once for all cells), built from command-line overrides with `load_config`: every cell
prints the `squall train ...` line that reproduces it. The markdown is rewritten after every
cell (pending cells show `...`), so an interrupted run still leaves what it measured; the
hand-written section from `## Reading` on is kept when the file is rewritten.

    .venv/bin/python -m benchmarks.robustness --in-process --out <file.md>

runs the same cells without Ray or worker processes (`replica`): the driver computes every
worker's gradient itself with the library's data split, batches, noise, attack injection,
non-finite rejection, rules and optimizer, in the same order and float32 ops, so it gives the
same numbers as the real runs (compare the cells run both ways) at a tenth of the cost: on a
small shared machine most of a real cell is starting its 11 actor processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from benchmarks.md_parts import invocation
from orchestrator.config import Config, load_config
from orchestrator.data import batch_indices, shard_of
from orchestrator.models import float_buffers
from orchestrator.optimizer import build_optimizer
from orchestrator.parameter_server import Aggregation
from orchestrator.run import train
from orchestrator.workload import DataInfo, data_info, resolve_workload
from strategies.attacks import alie_z, flip_labels
from strategies.bitpack import pack_signs, unpack_signs

WORKERS, F, SEED, STEPS = 11, 2, 0, 100
IPM_EPS, GAUSS_STD, COORD_SCALES = 10.0, 200.0, (0.5, 1.0)
BASE = ["data=digits", "model=mlp", f"workers={WORKERS}", f"seed={SEED}", "eval.every=0",
        "log.progress=false", "checkpoint.every_steps=0"]
# sign_vote moves every coordinate by +-lr each step: it needs a much smaller step than the
# default sgd lr 0.05 momentum 0.9.
SIGN_OPTIM = ["optim.lr=0.003", "optim.momentum=0"]
RULES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
         "centered_clip", "sign_vote"]
# Rows of table 1 in the order they run (the strong attacks first).
ATTACKS: dict[str, list[str]] = {
    "none": [f"strategy.f={F}"],  # clean run, the rule still told f = F
    "ipm": ["byzantine.attack=ipm", f"byzantine.eps={IPM_EPS:g}"],
    "gaussian": ["byzantine.attack=gaussian", f"byzantine.std={GAUSS_STD:g}"],
    "alie": ["byzantine.attack=alie"],
    "bulyan_coord": ["byzantine.attack=bulyan_coord", f"byzantine.scale={COORD_SCALES[0]:g}"],
    "sign_flip": ["byzantine.attack=sign_flip"],
    "label_flip": ["byzantine.attack=label_flip"],
    "nan": ["byzantine.attack=nan"],
}
COORD_RULES = ["krum", "bulyan", "geomed"]  # table 2: the attack of El Mhamdi et al.
NONIID = ["data.partition=classes_per_worker", "data.classes_per_worker=1"]  # table 3, f = 0
NOISE_RULES, NOISES = ["sign_vote", "median"], [0.0, 0.01, 0.03]


def rule_overrides(rule: str) -> list[str]:
    return [f"strategy={rule}", *(SIGN_OPTIM if rule == "sign_vote" else [])]


def attack_overrides(attack: str) -> list[str]:
    return ATTACKS[attack] if attack == "none" else [f"byzantine.f={F}", *ATTACKS[attack]]


def coord_overrides(scale: float) -> list[str]:
    return [f"byzantine.f={F}", "byzantine.attack=bulyan_coord", f"byzantine.scale={scale:g}"]


@dataclass
class Cell:
    overrides: list[str]
    summary: dict | None = None  # None until it ran


class Grid:
    """The cells of all tables, keyed by their overrides (a cell shared by two tables runs once)."""

    def __init__(self, steps: int, rules: list[str], attacks: list[str], coord_rules: list[str],
                 noise_rules: list[str], noises: list[float]) -> None:
        self.steps = steps
        self.rules, self.attacks, self.coord_rules = rules, attacks, coord_rules
        self.noise_rules, self.noises = noise_rules, noises
        self.cells: dict[tuple[str, ...], Cell] = {}  # in the order they run:
        for attack in attacks[:5]:  # clean and the strong attacks first, then tables 2 and 3
            for rule in rules:
                self.cell([*rule_overrides(rule), *attack_overrides(attack)])
        for scale in COORD_SCALES:
            for rule in coord_rules:
                self.cell([*rule_overrides(rule), *coord_overrides(scale)])
        self.cell(["strategy=mean", *NONIID])
        for rule in noise_rules:
            for b in noises:
                self.cell([*rule_overrides(rule), *NONIID, f"strategy.noise={b:g}"])
        for attack in attacks[5:]:
            for rule in rules:
                self.cell([*rule_overrides(rule), *attack_overrides(attack)])

    def cell(self, overrides: list[str]) -> Cell:
        args = [f"steps={self.steps}", *overrides]
        return self.cells.setdefault(tuple(args), Cell(args))

    def tables(self) -> list[str]:
        t1 = [[attack, *(fmt(self.cell([*rule_overrides(r), *attack_overrides(attack)]))
                         for r in self.rules)] for attack in self.attacks]
        t2 = [[f"none (f=0 attackers, told f={F})",
               *(fmt(self.cell([*rule_overrides(r), *attack_overrides("none")]), True)
                 for r in self.coord_rules)]]
        t2 += [[f"bulyan_coord scale={s:g}",
                *(fmt(self.cell([*rule_overrides(r), *coord_overrides(s)]), True)
                  for r in self.coord_rules)] for s in COORD_SCALES]
        t3 = [["mean (reference)", fmt(self.cell(["strategy=mean", *NONIID])),
               *([""] * (len(self.noises) - 1))]]
        t3 += [[rule, *(fmt(self.cell([*rule_overrides(rule), *NONIID, f"strategy.noise={b:g}"]))
                        for b in self.noises)] for rule in self.noise_rules]
        return [
            f"## 1. Every attack x every rule (n = {WORKERS}, f = {F}, {self.steps} steps)", "",
            *table(["attack \\ rule", *self.rules], t1), "",
            "## 2. bulyan_coord against Krum, Bulyan and the geometric median", "",
            "w0 is the final value of the attacked coordinate 0 (see the notes above).", "",
            *table(["setting \\ rule", *self.coord_rules], t2), "",
            "## 3. Non-iid data and the noise of Chen et al. 2020 (no Byzantine workers)", "",
            f"`{' '.join(NONIID)}`: every worker holds one class (two workers hold class 0). "
            "Each worker adds strategy.noise x N(0, I) to its gradient before the sign "
            "(sign_vote) or before the median.", "",
            *table(["rule \\ strategy.noise", *(f"{b:g}" for b in self.noises)], t3),
        ]


def fmt(cell: Cell, show_w0: bool = False) -> str:
    s = cell.summary
    if s is None:
        return "..."
    notes = [f"skipped {s['skipped_steps']}"] if s["skipped_steps"] else []
    notes += [f"rejected {s['rejected_updates']}"] if s["rejected_updates"] else []
    if s["preemptions"]:  # a worker process died: nothing here simulates that
        notes.append(f"workers lost {s['preemptions']}")
    if s["error"]:
        notes.append(f"error: {s['error']}")
    if show_w0:
        notes.append(f"w0 {s['w0']:+.3g}")
    return f"{s['test_acc']:.3f}" + (f" ({', '.join(notes)})" if notes else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def run_cell(cell: Cell, run_dir: str, index: int, in_process: bool) -> None:
    cfg = load_config([*BASE, *cell.overrides, f"run.dir={run_dir}", f"run.name=cell{index:03d}"])
    if in_process:
        cell.summary = replica(cfg)
        return
    summary = train(cfg)
    if summary["interrupted"]:  # train() caught Ctrl-C: stop the whole benchmark
        raise KeyboardInterrupt
    state = torch.load(Path(summary["run_dir"]) / "model.pt", weights_only=True)
    summary["w0"] = float(next(iter(state.values())).reshape(-1)[0])  # bulyan_coord's target
    cell.summary = summary


def replica(cfg: Config) -> dict:
    """`train(cfg)`'s arithmetic in this process, for a model without buffers and no worker
    ever lost: each step, every rank's gradient on its batch (as `Worker.gradient`), then the
    driver's `Aggregation` and optimizer step (as the loop in `train`)."""
    torch.set_num_threads(1)  # as each worker actor (worker.num_cpus=1)
    assert cfg.worker.grad_accum == 1, "replica: one micro-batch per step only"
    workload = resolve_workload(cfg)
    test_set, train_set = workload.dataset("test"), workload.dataset("train")
    info = data_info(test_set)
    torch.manual_seed(cfg.seed)
    model = workload.model(info)
    assert not float_buffers(model), "replica: models with buffers are not replicated"
    params = list(model.parameters())
    optimizer = build_optimizer(cfg.optim, params)
    aggregation = Aggregation(cfg)
    x_train, y_train = train_set.tensors
    shards = [torch.from_numpy(shard_of(train_set, rank, cfg.workers, cfg.data, cfg.seed))
              for rank in range(cfg.workers)]
    x = [x_train[s] for s in shards]
    y = [y_train[s] for s in shards]
    if cfg.byzantine.attack == "label_flip":
        y = [flip_labels(t, info.num_classes) if r in aggregation.byzantine else t
             for r, t in enumerate(y)]
    n_params, skipped = sum(p.numel() for p in params), 0
    for step in range(1, cfg.steps + 1):
        grads = []
        for rank in range(cfg.workers):
            idx = torch.from_numpy(batch_indices(len(y[rank]), cfg.data.batch_size, step,
                                                 cfg.seed, rank))
            model.zero_grad(set_to_none=False)
            workload.loss(model, (x[rank][idx], y[rank][idx])).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            if cfg.strategy.noise:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
                grad += cfg.strategy.noise * torch.randn(grad.shape, generator=gen)
            if cfg.strategy.name == "sign_vote":
                grad = unpack_signs(pack_signs(grad), n_params)
            grads.append(grad)
        update = aggregation(torch.stack(grads), list(range(cfg.workers)), step)
        if update is None:
            skipped += 1
            continue
        for p, g in zip(params, update.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
        optimizer.step()
    return {**workload.evaluate(model, test_set, cfg.eval.batch_size), "skipped_steps": skipped,
            "rejected_updates": aggregation.rejected, "preemptions": 0, "error": "",
            "w0": float(params[0].detach().reshape(-1)[0])}


def header(grid: Grid, cmd: str, done: int, elapsed_s: float, in_process: bool) -> list[str]:
    cfg = load_config(BASE)
    torch.manual_seed(SEED)  # as train() does before building the model
    model = resolve_workload(cfg).model(DataInfo((1, 8, 8), 10))
    w0_init = float(next(iter(model.state_dict().values())).reshape(-1)[0])
    total = len(grid.cells)
    status = (f"{total} training runs" if done == total else
              f"**incomplete: {done} of {total} runs done** (`...` = not run)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        "# Byzantine robustness: final test accuracy, every attack x every rule", "",
        f"Produced by `{cmd}` (from the repository root): {status}, "
        f"{elapsed_s / 60:.0f} min.", "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), "
        f"load average {load} when this was written (this benchmark included); "
        + ("**in-process replicas of `train`** (`replica` in the script: no Ray, the driver "
           "computes every worker's gradient itself, 1 thread); " if in_process else
           "one Ray session `ray.init(num_cpus=12)` for all runs, one CPU per worker actor; ")
        + f"torch "
        f"{torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}",
        f"- every run: `squall train {' '.join(BASE)} steps={grid.steps}` plus the cell's "
        "overrides (the script prints each cell's full line); digits: 1437 train / 360 test "
        f"images, {cfg.data.batch_size} samples per worker per step, sgd lr {cfg.optim.lr:g} "
        f"momentum {cfg.optim.momentum:g}; sign_vote instead `{' '.join(SIGN_OPTIM)}`",
        f"- n = {WORKERS} workers; attacked rows: `byzantine.f={F}` (ranks fixed by seed "
        f"{SEED}) and the rules are told f = {F}; row `none`: no attacker, `strategy.f={F}` "
        "(the rules discard as if 2 were Byzantine)",
        f"- attacks (strategies/attacks.py; the attackers see the honest gradients of the step): "
        f"sign_flip (-honest mean); gaussian (N(0, {GAUSS_STD:g}^2 I)); label_flip "
        f"(y -> 9 - y on the attackers' data); alie (mean - z std per coordinate, "
        f"z = {alie_z(WORKERS, F):.3f} from n and f as in Baruch et al.); ipm (eps = "
        f"{IPM_EPS:g}: the mean of all {WORKERS} becomes ({WORKERS - F} - {F} x {IPM_EPS:g})"
        f"/{WORKERS} = {(WORKERS - F - F * IPM_EPS) / WORKERS:.2f} x the honest mean); "
        f"bulyan_coord (every coordinate at the honest mean except coordinate 0, shifted by "
        f"scale x sqrt(d) x the RMS honest std; scale {COORD_SCALES[0]:g} in table 1); nan "
        "(all-NaN rows: the driver rejects non-finite rows before any rule, `rejected` counts "
        "them); sign_vote attackers send the sign of the forged vector (1 bit per coordinate)",
        "- coordinate 0 is the weight from pixel (0, 0), blank in every digit (a constant "
        f"input after normalisation), to hidden unit 0: it acts as that unit's bias; it starts "
        f"at {w0_init:+.4f}",
        "- a cell reads `test accuracy (skipped N, rejected N)`, counts shown when non-zero",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, prints only")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of every run")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    parser.add_argument("--in-process", action="store_true",
                        help="run the cells as in-process replicas of train (no Ray)")
    parser.add_argument("--only", default="", metavar="REGEX",
                        help="run only the cells whose overrides match (the others show ...)")
    args = parser.parse_args()
    if args.quick:
        grid = Grid(5, ["mean", "median"], ["none", "ipm"], ["krum"], ["median"], [0.0])
    else:
        grid = Grid(args.steps, RULES, list(ATTACKS), COORD_RULES, NOISE_RULES, NOISES)
    cmd = invocation("benchmarks.robustness")
    todo = [c for c in grid.cells.values() if re.search(args.only, " ".join(c.overrides))]
    print(f"{len(todo)} runs; each is `squall train {' '.join(BASE)} <overrides>`", flush=True)

    t_start = time.perf_counter()
    if not args.in_process:
        ray.init(address="local", num_cpus=12, include_dashboard=False, logging_level="WARNING")
    done = 0
    with tempfile.TemporaryDirectory(prefix="squall-robustness-") as run_dir:
        for cell in todo:
            t0 = time.perf_counter()
            run_cell(cell, run_dir, done, args.in_process)
            done += 1
            s = cell.summary
            print(f"[{done:3d}/{len(todo)}] {time.perf_counter() - t0:5.1f} s  "
                  f"acc {s['test_acc']:.3f}  skipped {s['skipped_steps']}  rejected "
                  f"{s['rejected_updates']}  w0 {s['w0']:+.3g}  | squall train "
                  f"{' '.join(cell.overrides)}", flush=True)
            if not args.quick:
                write(args.out, header(grid, cmd, done, time.perf_counter() - t_start,
                                       args.in_process) + grid.tables())
    ray.shutdown()
    if args.quick:
        print("\n".join(grid.tables()))
    print(f"{done} runs in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)


def write(out: Path, lines: list[str]) -> None:
    """Write the generated part, keeping a hand-written `## Reading` section if there is one."""
    old = out.read_text() if out.exists() else ""
    reading = old[old.index("\n## Reading"):] if "\n## Reading" in old else ""
    out.write_text("\n".join(lines) + "\n" + reading)


if __name__ == "__main__":
    main()
