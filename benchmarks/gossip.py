"""Gossip benchmark: D-PSGD vs Moniqua at 8/4/2/1 bits vs CHOCO on digits, 8 workers.

    python -m benchmarks.gossip [--steps 300] [--quick]

Runs every configuration through squall's own training job in one local Ray session and
writes benchmarks/gossip.md: final test accuracy of the averaged model, final consensus
distance, bytes sent per worker per step, and wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

import ray  # noqa: E402
import torch  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402
from orchestrator.run import train  # noqa: E402

METHODS = {  # squall's defaults unless stated: dither rounding, theta per block of 128, margin 1.2
    "D-PSGD (fp32)": ["strategy.compress=none"],
    "Moniqua 8 bits": ["strategy.compress=moniqua", "strategy.bits=8"],
    "Moniqua 4 bits": ["strategy.compress=moniqua", "strategy.bits=4"],
    "Moniqua 2 bits": ["strategy.compress=moniqua", "strategy.bits=2"],
    "Moniqua 1 bit": ["strategy.compress=moniqua", "strategy.bits=1"],
    "Moniqua 2 bits, one theta, nearest (before)": [
        "strategy.compress=moniqua", "strategy.bits=2", "strategy.block_size=0",
        "strategy.rounding=nearest", "strategy.gamma=1", "strategy.theta_margin=2"],
    "CHOCO (sign)": ["strategy.compress=choco"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a few steps, one topology")
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    topologies = ["ring"] if args.quick else ["ring", "exponential"]
    common = ["strategy=gossip", "workers=8", "model=mlp", f"steps={steps}", "optim.lr=0.1",
              "optim.momentum=0", "log.progress=false", "eval.every=0",
              "strategy.consensus_every=10"]
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="warning")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for topology in topologies:
            for name, overrides in METHODS.items():
                cfg = load_config([*common, f"strategy.topology={topology}", *overrides,
                                   f"run.dir={tmp}"])
                t0 = time.perf_counter()
                summary = train(cfg)
                wall = time.perf_counter() - t0
                metrics = read_metrics(summary["run_dir"])
                consensus = [m["consensus_dist"] for m in metrics if "consensus_dist" in m]
                rows.append((topology, name, summary["test_acc"], consensus[-1],
                             summary["bytes_per_worker_step"], wall, summary["wraps"]))
                print(rows[-1], flush=True)
    ray.shutdown()

    dense = {r[0]: r for r in rows if r[1].startswith("D-PSGD")}
    lines = ["# Gossip: D-PSGD vs Moniqua vs CHOCO", "",
             f"Produced by `python -m benchmarks.gossip --steps {steps}` from the repository root.",
             "",
             f"- machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, Ray {ray.__version__}",
             f"- digits, 8 workers, mlp, {steps} steps, batch 32 per worker, plain SGD lr 0.1, "
             "seed 0; the accuracy is that of the averaged model",
             "- bytes/worker/step counts the message each worker puts into the object store "
             "(payload and header); ratio = D-PSGD bytes / these bytes",
             "- consensus dist: mean ||x_i - x_bar|| over the replicas at the last step, and its "
             "ratio to D-PSGD's", "",
             "| topology | method | test acc | vs D-PSGD (points) | consensus dist | "
             "vs D-PSGD | bytes/worker/step | fewer bytes | wall s | wraps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for topology, name, acc, cons, nbytes, wall, wraps in rows:
        base = dense[topology]
        lines.append(f"| {topology} | {name} | {acc:.4f} | {100 * (acc - base[2]):+.1f} | "
                     f"{cons:.3f} | {cons / base[3]:.1f}x | {nbytes:,.0f} | "
                     f"{base[4] / nbytes:.1f}x | {wall:.1f} | {wraps} |")
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
