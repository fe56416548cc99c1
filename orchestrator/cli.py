"""The `squall` command: train, config."""

from __future__ import annotations

import signal
import sys

from orchestrator.config import ConfigError, help_text, load_config, repeated_overrides, to_yaml

USAGE = """usage: squall <command> [group=option ...] [key=value ...]

commands:
  train    run a training job (squall train --help lists every option)
  config   print the resolved configuration
  trace    write a synthetic spot price history CSV: squall trace FILE [hours=24] [base=0.1]
           [on_demand=0.4] [spikes_per_day=6] [seed=0] (use it as cloud.trace=FILE)
  sweep    run the cross product of comma-separated overrides: squall sweep workers=2,4,8
           cloud=simulated cloud.preempt_prob=0,0.05 [overrides] (writes sweep.csv, sweep.md)
  plan     cheapest workers (and bid) for a target: squall plan workers=1,2,4,8 steps=500
           [deadline=S] [--check] [overrides] (docs/planning.md lists every option)
  report   PNG plots and index.html for a run or sweep: squall report runs/<name>
  cloud    AWS helpers (docs/aws.md): squall cloud cleanup run.name=NAME terminates what a run
           left running; squall cloud prices out=FILE [hours=24] [zone=AZ] exports spot prices

examples:
  squall train
  squall train model.target=mymodule:make_model data.target=mymodule:make_data
  squall train workers=8 steps=500 optim.lr=0.1
  squall config model=mlp data.batch_size=64"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = args[0], args[1:]
    if command == "trace":
        return write_synthetic_trace(overrides)
    if command in ("sweep", "plan", "report"):
        return run_planning_command(command, overrides)
    if command == "cloud":
        return run_cloud_command(overrides)
    if command not in ("train", "config"):
        return _fail(f"unknown command '{command}'; valid: train, config, trace, sweep, "
                     "plan, report, cloud")
    if any(a in ("-h", "--help") for a in overrides):
        print(help_text(command))
        return 0
    try:
        cfg = load_config(overrides)
        if command == "train":
            from orchestrator.preflight import preflight

            preflight(cfg)  # the paths the run writes: before Ray, creating nothing
        from orchestrator.supervise import supervise, supervised_child

        for note in [] if supervised_child() else repeated_overrides(overrides):
            print(f"squall: note: {note}", file=sys.stderr)  # (the supervisor's said it)
        if command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if cfg.run.restarts and not supervised_child():
            return supervise(cfg, overrides)
        from orchestrator.checkpoint import CheckpointError
        from orchestrator.run import train  # imports Ray and torch: only when training

        try:
            summary = train(cfg)
        except CheckpointError as e:  # the store failed during the run: not the input's fault
            print(f"squall: stopped: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        return _fail(str(e))
    if summary["error"]:
        print(f"squall: stopped: {summary['error']}", file=sys.stderr)
        return 1
    if not summary["interrupted"]:
        return 0
    return 128 + getattr(signal.Signals, summary["signal"] or "SIGINT")  # 130, 143, 129


def write_synthetic_trace(args: list[str]) -> int:
    from cloud.traces import synthetic_trace, write_trace

    numbers = {"hours": float, "base": float, "on_demand": float, "spikes_per_day": float,
               "seed": int}
    if not args or "=" in args[0]:
        return _fail("squall trace FILE [hours=24] [base=0.1] [on_demand=0.4] "
                     "[spikes_per_day=6] [seed=0]")
    options = {}
    for text in args[1:]:
        key, _, value = text.partition("=")
        if key not in numbers:
            return _fail(f"squall trace: unknown option '{key}'; valid: {', '.join(numbers)}")
        try:
            options[key] = numbers[key](value)
        except ValueError:
            return _fail(f"squall trace: {text}: expected a number")
    rows = synthetic_trace(**options)
    write_trace(rows, args[0])
    print(f"squall: wrote {len(rows)} price points to {args[0]}")
    return 0


def run_planning_command(command: str, args: list[str]) -> int:
    """squall sweep / plan / report (docs/planning.md)."""
    try:
        if command == "sweep":
            from orchestrator.sweep import run_sweep

            return run_sweep(args)
        if command == "plan":
            from orchestrator.planner import PLAN_USAGE, run_plan

            if any(a in ("-h", "--help") for a in args):
                print(PLAN_USAGE)
                return 0
            return run_plan(args)
        if len(args) != 1:
            return _fail("usage: squall report RUN_OR_SWEEP_DIR")
        from orchestrator.report import report

        print(f"squall: wrote {report(args[0])}")
        return 0
    except ConfigError as e:
        return _fail(str(e))


CLOUD_USAGE = ("squall cloud cleanup run.name=NAME [cloud.region=...] | squall cloud prices "
               "out=FILE [hours=24] [zone=us-east-1a] [cloud.instance_types=[...]]")


def run_cloud_command(args: list[str]) -> int:
    """squall cloud cleanup / prices (docs/aws.md): the overrides make a cloud=aws config,
    whose cloud slice goes to cloud/aws.py."""
    try:
        if not args or args[0] not in ("cleanup", "prices"):
            raise ConfigError(f"usage: {CLOUD_USAGE}")
        command, options, overrides = args[0], {}, []
        for text in args[1:]:
            key, _, value = text.partition("=")
            if command == "prices" and key in ("out", "hours", "zone"):
                options[key] = value
            else:
                overrides.append(text)
        cfg = load_config(["cloud=aws", *overrides])
        from cloud.aws import JOB_TAG, cleanup, export_prices  # boto3 and Ray: only here

        if command == "cleanup":
            ids = cleanup(cfg.cloud, cfg.run.name)
            print(f"squall: terminated {len(ids)} instance(s) tagged {JOB_TAG}={cfg.run.name}"
                  + (f": {' '.join(ids)}" if ids else ""))
            return 0
        if not options.get("out"):
            raise ConfigError(f"squall cloud prices needs out=FILE; usage: {CLOUD_USAGE}")
        try:
            hours = float(options.get("hours", 24))
        except ValueError:
            raise ConfigError(f"hours={options['hours']}: expected a number of hours") from None
        print(export_prices(cfg.cloud, options["out"], hours, options.get("zone", "")))
        return 0
    except ConfigError as e:
        return _fail(str(e))


def _fail(message: str) -> int:
    print(f"squall: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
