"""The `squall` command: train, config."""

from __future__ import annotations

import sys

from orchestrator.config import ConfigError, help_text, load_config, to_yaml

USAGE = """usage: squall <command> [group=option ...] [key=value ...]

commands:
  train    run a training job (squall train --help lists every option)
  config   print the resolved configuration

examples:
  squall train
  squall train workers=8 steps=500 optim.lr=0.1
  squall config model=mlp data.batch_size=64"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = args[0], args[1:]
    if command not in ("train", "config"):
        return _fail(f"unknown command '{command}'; valid: train, config")
    if any(a in ("-h", "--help") for a in overrides):
        print(help_text(command))
        return 0
    try:
        cfg = load_config(overrides)
        if command == "config":
            print(to_yaml(cfg), end="")
            return 0
        from orchestrator.job import train  # imports Ray and torch: only when training

        summary = train(cfg)
    except ConfigError as e:
        return _fail(str(e))
    if summary["error"]:
        print(f"squall: stopped: {summary['error']}", file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0


def _fail(message: str) -> int:
    print(f"squall: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
