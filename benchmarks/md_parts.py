"""Markdown files made of parts: each benchmark part rewrites only its own block."""

from __future__ import annotations

import re
from pathlib import Path


def write_part(md: Path, title: str, key: str, text: str) -> None:
    """Replace the block `<!-- key -->...<!-- /key -->` of md (a new file starts with the
    title), keeping everything else."""
    old = md.read_text() if md.exists() else f"# {title}\n"
    block = f"<!-- {key} -->\n{text}\n<!-- /{key} -->"
    pattern = re.compile(f"<!-- {key} -->.*?<!-- /{key} -->", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old}\n{block}\n"
    md.write_text(new)
