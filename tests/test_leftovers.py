"""A driver killed with SIGKILL leaves no process of its Ray session behind (cloud/pool.py,
`watch_local_ray`): Ray's DashboardAgent and RuntimeEnvAgent used to stay for a minute,
ignoring SIGTERM, and the raylets of a simulated pool's added nodes for good.

The processes are found by their session id: the driver is started in a session of its own
(start_new_session), which every Ray process it starts inherits, so no other Ray on the
machine (other tests') is looked at or touched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def processes() -> dict[int, tuple[int, int, int, str, bytes]]:
    """pid -> (parent, session id, start time, state, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0],
                                  cmdline)
    return found


def alive(snapshot: dict[int, tuple], session: int) -> dict[int, bytes]:
    """Those of `snapshot` (the same process: same start time) or of the session that still
    run; zombies (dead, not yet reaped by init) do not count."""
    now = processes()
    return {pid: p[4].split(b"\0")[0][-80:] for pid, p in now.items() if p[3] != "Z" and (
        p[1] == session or (pid in snapshot and snapshot[pid][2] == p[2]))}


@pytest.mark.parametrize("cloud", ["local", "simulated"])
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path, cloud):
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train", "steps=100000", "workers=2",
         f"cloud={cloud}", "log.progress=false", "eval.every=0", "checkpoint.every_steps=0",
         f"run.dir={tmp_path}", "run.name=killed"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot: dict[int, tuple] = {}
    try:
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.stat().st_size):  # training: Ray is all up
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        snapshot = {pid: p for pid, p in processes().items()
                    if p[1] == driver.pid or p[0] == driver.pid}  # + the watchdog (own session)
        titles = [p[4] for p in snapshot.values()]
        agents = [t for t in titles if t.startswith((b"ray::DashboardAgent", b"ray::RuntimeEnv"))]
        assert len(agents) == (2 if cloud == "local" else 6)  # one pair per node
        assert any(b"raylet" in t for t in titles) and any(b"gcs_server" in t for t in titles)

        driver.kill()  # the driver only, not its process group or session
        driver.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (left := alive(snapshot, driver.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running 15 s after the driver died: {left}"
    finally:
        driver.kill()
        driver.wait(timeout=30)
        log.close()
        for pid in alive(snapshot, driver.pid):  # a failed test leaves nothing either
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
