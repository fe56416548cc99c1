"""Find the Ray worker processes of this test process's own Ray session (not of any other
Ray running on the machine)."""

from __future__ import annotations

import os
from pathlib import Path


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def own_ray_workers(name: str) -> list[int]:
    """PIDs whose command line starts with `name` (e.g. 'ray::Worker') and that descend from
    this process (the local Ray it started), oldest first: the last ones belong to the run
    started last (actors of an earlier run in the same session may still be exiting)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(name.encode()):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != me:
                pid = _parent(pid)
        except (OSError, ValueError):
            continue
        if pid == me:
            found.append(int(entry.name))
    return sorted(found, key=_start_time)
