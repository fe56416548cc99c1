"""Markdown files made of parts: each benchmark part rewrites only its own block."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def write_part(md: Path, title: str, key: str, text: str) -> None:
    """Replace the block `<!-- key -->...<!-- /key -->` of md (a new file starts with the
    title), keeping everything else."""
    old = md.read_text() if md.exists() else f"# {title}\n"
    block = f"<!-- {key} -->\n{text}\n<!-- /{key} -->"
    pattern = re.compile(f"<!-- {key} -->.*?<!-- /{key} -->", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old}\n{block}\n"
    md.write_text(new)


GENERATED, END_GENERATED = "<!-- generated -->", "<!-- end generated -->"


def write_generated(md: Path, title: str, text: str, notes: str = "") -> None:
    """Replace the part of md between GENERATED and END_GENERATED with `text`, keeping
    everything outside it (the title, hand-written reading notes). A new file is the title,
    the part and `notes`; a file without the markers gets the part after its first line."""
    block = f"{GENERATED}\n{text.strip(chr(10))}\n{END_GENERATED}"
    old = md.read_text() if md.exists() else f"# {title}\n\n{notes}"
    pattern = re.compile(re.escape(GENERATED) + ".*?" + re.escape(END_GENERATED), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        first, _, rest = old.partition("\n")
        new = f"{first}\n\n{block}\n\n{rest.lstrip()}"
    md.write_text(new.rstrip("\n") + "\n")


def invocation(module: str) -> str:
    """The command line that ran this benchmark, as `python -m MODULE ARGS` (for its md)."""
    return f"python -m {module}" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
