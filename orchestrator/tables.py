"""The README's tables of rules, pre-aggregation steps, attacks, topologies and compressors,
generated from the registries (`strategies.registry`), so they are never copied by hand.

    python -m orchestrator.tables                    # print every table
    python -m orchestrator.tables rules attacks      # print some of them
    python -m orchestrator.tables --write README.md  # replace the generated tables in a file
    python -m orchestrator.tables --check README.md  # exit status 1 when a file is out of date

In a markdown file a generated table is the block of `|` lines right after its marker line
`<!-- generated: python -m orchestrator.tables <kind> -->`; tests/test_docs.py checks the
README against this output.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from strategies.registry import ATTACKS, COMPRESSORS, PREAGGREGATORS, RULES, TOPOLOGIES, Registry


@dataclass(frozen=True)
class Table:
    registry: Registry
    column: str  # heading of the name column
    needs: bool  # a "needs" column with each entry's requirement


TABLES: dict[str, Table] = {
    "rules": Table(RULES, "rule", needs=True),
    "preaggregation": Table(PREAGGREGATORS, "step", needs=False),
    "attacks": Table(ATTACKS, "attack", needs=False),
    "topologies": Table(TOPOLOGIES, "topology", needs=False),
    "compressors": Table(COMPRESSORS, "compressor", needs=False),
}


def marker(kind: str) -> str:
    """The line that precedes the generated table `kind` in a markdown file."""
    return f"<!-- generated: python -m orchestrator.tables {kind} -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(kind: str) -> str:
    """Table `kind` as markdown lines (no trailing newline), one row per registered entry in
    registration order."""
    table = TABLES[kind]
    columns = [table.column, "what it does"] + (["needs"] if table.needs else [])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for entry in table.registry.entries():
        cells = [f"`{entry.name}`", _cell(entry.description)]
        if table.needs:
            cells.append(_cell(entry.requirement))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generated_blocks(text: str) -> dict[str, str]:
    """{kind: the table after its marker} for every marker in a markdown text."""
    lines, found = text.splitlines(), {}
    for i, line in enumerate(lines):
        match = re.fullmatch(r"<!-- generated: python -m orchestrator\.tables (\w+) -->",
                             line.strip())
        if match:
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            found[match.group(1)] = "\n".join(rows)
    return found


def rewrite(text: str) -> str:
    """`text` with every generated table replaced by the current output."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = re.fullmatch(r"<!-- generated: python -m orchestrator\.tables (\w+) -->",
                             lines[i].strip())
        i += 1
        if match and match.group(1) in TABLES:
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            out.append(markdown(match.group(1)) + "\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.tables",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", metavar="KIND",
                        help=f"tables to print (default: all): {', '.join(TABLES)}")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", type=Path,
                       help="replace the generated tables in FILE")
    group.add_argument("--check", metavar="FILE", type=Path,
                       help="exit status 1 when FILE's generated tables are out of date")
    args = parser.parse_args(argv)
    for kind in args.kinds:
        if kind not in TABLES:
            parser.error(f"unknown table {kind!r}; valid: {', '.join(TABLES)}")
    if args.write or args.check:
        path = args.write or args.check
        text = path.read_text()
        new = rewrite(text)
        if args.write:
            if new != text:
                path.write_text(new)
            return 0
        stale = [kind for kind, block in generated_blocks(text).items()
                 if kind in TABLES and block != markdown(kind)]
        unknown = [kind for kind in generated_blocks(text) if kind not in TABLES]
        for kind in stale:
            print(f"{path}: table {kind!r} is out of date; run python -m orchestrator.tables "
                  f"--write {path}", file=sys.stderr)
        for kind in unknown:
            print(f"{path}: unknown table {kind!r}; valid: {', '.join(TABLES)}", file=sys.stderr)
        return 1 if stale or unknown else 0
    for kind in args.kinds or TABLES:
        print(marker(kind))
        print(markdown(kind))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
