"""`squall train` runs unchanged on a Ray cluster started with `ray start`: through
RAY_ADDRESS, through ray.address=, and as a `ray job submit` entrypoint."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node with Ray's token authentication, as a production cluster would have. It runs
    in its own process group (`ray start --block`), so stopping it touches no other Ray."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, dashboard = free_port(), free_port()
    # the job agent's ports too: another Ray on this machine may hold the defaults (52365)
    # and the jobs would find no agent
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", head)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            os.environ.pop(name)


def wait_for(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    """Until the head's dashboard answers (it starts last)."""
    deadline = time.time() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            opener.open(url, timeout=2)
            return
        except urllib.error.HTTPError:  # an answer (401 without the token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def squall_args(run_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "train", "steps=20", "workers=2",
            "log.progress=false", "eval.every=0", f"run.dir={run_dir}", f"run.name={name}"]


def test_ray_address_env_and_config_key(cluster, tmp_path):
    gcs, _ = cluster
    env = {**os.environ, "RAY_ADDRESS": gcs}
    proc = subprocess.run(squall_args(tmp_path, "env"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "env" / "summary.json").read_text())["ray_address"] == gcs

    env.pop("RAY_ADDRESS")
    proc = subprocess.run([*squall_args(tmp_path, "key"), f"ray.address={gcs}", "cloud=static"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "key" / "summary.json").read_text())
    assert summary["ray_address"] == gcs
    assert summary["on_demand_cost_usd"] > 0  # cloud=static prices the machines on demand

    proc = subprocess.run([*squall_args(tmp_path, "none"), "cloud=static"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("squall: error: cloud=static needs the cluster's address: "
                                   "ray.address=<host:port> or $RAY_ADDRESS")


def test_an_address_where_no_cluster_listens_is_one_line_at_once(tmp_path):
    """ray.init would retry for minutes and end in a traceback."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([*squall_args(tmp_path, "dead"), f"ray.address={address}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"squall: error: ray.address={address}: no Ray cluster answers there (Connection "
        "refused); start one with `ray start --head` or fix the address")


def test_ray_job_submit_with_the_users_own_module(cluster, tmp_path):
    """An example's own model and data module, shipped with `--working-dir`: the driver and
    the workers of the cluster import it from the job's working directory."""
    gcs, dashboard = cluster
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes"
    proc = subprocess.run([RAY, "job", "submit", "--address", dashboard, "--working-dir",
                           str(example), "--", *squall_args(tmp_path, "job"),
                           "model.target=shapes:make_model", "data.target=shapes:make_data",
                           "data.args.samples=400"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["ray_address"] == gcs and summary["steps_done"] == 20
    assert 0 <= summary["test_acc"] <= 1


def test_a_token_cluster_joined_without_token_mode_is_one_line_at_once(tmp_path):
    """`ray start --head` turns token authentication on where a token exists (here
    ~/.ray/auth_token); ray.init with an explicit address never does: it printed an
    InvalidAuthToken warning a second for 20 s, then an error that did not say why. Now one
    gRPC call finds out first (on a loaded machine the interpreter's start-up alone can take
    seconds, so the test checks the one line, not the time)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    gcs = free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:  # until the GCS listens
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "the head's GCS did not start"
                time.sleep(0.5)
        address = f"127.0.0.1:{gcs}"
        proc = subprocess.run([*squall_args(tmp_path, "token"), f"ray.address={address}"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip() == (
            f"squall: error: ray.address={address}: the cluster uses token authentication; "
            "set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
