"""Paths a run cannot write, and other invocations that used to end in a traceback or pass in
silence: each is one line on stderr with exit status 2, before Ray starts, leaving nothing
behind. The subprocess cases run the real `squall train`; the in-process ones call the
preflight on real directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from moto_server import FAKE_AWS_ENV, moto_server

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.preflight import preflight

LONG_NAME = "a" * 5000


def squall_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a `squall` subprocess: no AWS credentials from anywhere (empty
    config and credentials files, no instance metadata), no Ray address, and Ray's temporary
    directory inside tmp_path (Ray creates ray/ there when it starts)."""
    empty = tmp_path / "empty"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "SQUALL_S3_ENDPOINT_URL")}
    env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty),
               AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=str(tmp_path / "raytmp"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_squall(tmp_path: Path, args: list[str], env: dict[str, str]):
    """`python -m orchestrator train ARGS` in tmp_path; asserts it created nothing there (no
    run directory, no Ray session directory)."""
    env = squall_env(tmp_path, **env)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "raytmp").exists(), "Ray was started"
    assert snapshot(tmp_path) == before, "the failed invocation left files behind"
    return proc


def assert_one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"squall: error: {expected}"]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


# Each case: the arguments (a_file and tmp_path filled in) and the expected message.
CASES = {
    "checkpoint dir under /proc": (
        ["checkpoint.dir=/proc/nonexistent/x"],
        "checkpoint.dir=/proc/nonexistent/x: cannot create directories in /proc "
        "(No such file or directory)"),
    "checkpoint dir is a file": (
        ["checkpoint.dir={a_file}"], "checkpoint.dir={a_file}: a file, not a directory"),
    "checkpoint dir on S3 without credentials": (
        ["checkpoint.dir=s3://nobucket"],
        "checkpoint.dir=s3://nobucket: no AWS credentials found (boto3 default chain: env, "
        "~/.aws, instance role)"),
    "run dir under /proc": (
        ["run.dir=/proc/rel/runs"],
        "run.dir=/proc/rel/runs: cannot create directories in /proc (No such file or directory)"),
    "run dir read-only (even to root)": (
        ["run.dir=/sys/kernel"],
        "run.dir=/sys/kernel: cannot write in /sys/kernel (Operation not permitted)"),
    "run dir is a file": (["run.dir={a_file}"], "run.dir={a_file}: a file, not a directory"),
    "run name too long": (
        [f"run.name={LONG_NAME}"],
        "run.name=aaaaaaaaaaaaaaaaaaaaaaaa... (5000 characters): too long for the file system: "
        "a name of 5000 bytes; at most 255 bytes per path part in {tmp_path}"),
    "run name leaves run dir": (
        ["run.name=../../escape"],
        "run.name=../../escape: must name a directory inside run.dir (a relative path without "
        "'..' parts)"),
    "gossip with one worker": (
        ["strategy=gossip", "workers=1"],
        "strategy=gossip with workers=1: gossip needs at least 2 workers"),
    "a pool's own check, after the run's folders were made": (
        ["cloud=aws"],
        "cloud=aws needs cloud.ami: an image with Python, Ray and squall installed (see "
        "docs/aws.md)"),
    "a trace that is not there": (
        ["cloud=simulated", "cloud.trace=/nonexistent.csv"],
        "cloud.trace=/nonexistent.csv: cannot read it (No such file or directory)"),
    "a model target that does not import": (
        ["model.target=nowhere:build"],
        "model.target=nowhere:build: cannot import nowhere (ModuleNotFoundError: No module "
        "named 'nowhere')"),
    "a model factory that refuses its arguments": (
        ["model.args.depth=2"],
        "model.target=orchestrator.models:cnn: TypeError: cnn() got an unexpected keyword "
        "argument 'depth'"),
    "an eval target that raises, with a message of many lines": (
        ["eval.target=orchestrator.data:digits"],
        "eval.target=orchestrator.data:digits: ValueError: split must be 'train' or 'test', "
        "not Sequential( ..."),
    "repeated keys, then a mistake: only the error": (
        ["workers=2", "workers=3", "run.dir={a_file}"],
        "run.dir={a_file}: a file, not a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_invocation_is_one_line_exit_2_without_ray(case, tmp_path, a_file):
    args, expected = CASES[case]
    fill = {"a_file": a_file, "tmp_path": tmp_path}
    if not any(a.startswith("run.dir=") for a in args):
        args = [*args, f"run.dir={tmp_path}/runs"]
    proc = run_squall(tmp_path, [a.format(**fill) for a in args], {})
    assert_one_line_error(proc, expected.format(**fill))


@pytest.mark.parametrize("args, expected", [
    (["checkpoint.dir=gs://bucket/x"],
     "checkpoint.dir: unsupported scheme 'gs://'; valid: local path, s3://bucket/prefix"),
    (["run.dir={a_file}/runs"], "run.dir={a_file}/runs: {a_file} is a file, not a directory"),
    (["run.dir={tmp_path}", "run.name=a_file/y"],
     "run.name=a_file/y: {a_file} is a file, not a directory"),
])
def test_more_paths_in_process(args, expected, tmp_path, a_file, capsys):
    import ray

    fill = {"a_file": a_file, "tmp_path": tmp_path}
    assert main(["train", *(a.format(**fill) for a in args)]) == 2
    assert capsys.readouterr().err == f"squall: error: {expected.format(**fill)}\n"
    assert not ray.is_initialized()


def test_missing_bucket_is_one_line(tmp_path):
    """With credentials, against a real S3 API (moto) that has no such bucket."""
    with moto_server() as endpoint:
        proc = run_squall(tmp_path, ["checkpoint.dir=s3://nobucket/exp", f"run.dir={tmp_path}"],
                          {**FAKE_AWS_ENV, "SQUALL_S3_ENDPOINT_URL": endpoint})
    assert_one_line_error(proc, "checkpoint.dir=s3://nobucket/exp: bucket 'nobucket' does "
                                "not exist")


def test_repeated_keys_are_noted_and_the_last_wins(capsys):
    assert main(["config", "workers=2", "model=cnn", "workers=3", "model=mlp", "seed=1"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["squall: note: workers given twice; using workers=3",
                                "squall: note: model given twice; using model=mlp"]
    assert "workers: 3\n" in out and "name: mlp" in out
    assert main(["config", "seed=1", "seed=2", "seed=3"]) == 0
    assert capsys.readouterr().err == "squall: note: seed given 3 times; using seed=3\n"
    assert main(["config", "seed=1", "workers=2"]) == 0
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- in process
def config(tmp_path: Path, *overrides: str):
    return load_config([f"run.dir={tmp_path / 'runs'}", *overrides])


def test_a_fresh_run_and_a_resumed_one_pass_and_nothing_is_created(tmp_path):
    preflight(config(tmp_path, "run.name=exp1"))
    preflight(config(tmp_path, "run.name=sweep/a+b", f"checkpoint.dir={tmp_path}/c/d"))
    preflight(config(tmp_path))  # a timestamp name
    assert snapshot(tmp_path) == set()
    (tmp_path / "runs" / "exp1" / "checkpoints").mkdir(parents=True)  # as a run leaves it
    preflight(config(tmp_path, "run.name=exp1"))
    assert snapshot(tmp_path) == {"runs", "runs/exp1", "runs/exp1/checkpoints"}


def test_a_symbolic_link_out_of_run_dir_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as err:
        preflight(config(tmp_path, "run.name=out/x"))
    assert str(err.value) == (f"run.name=out/x: resolves to {tmp_path}/elsewhere/x, outside "
                              f"run.dir={tmp_path}/runs; it must name a directory inside run.dir")
    (tmp_path / "runs" / "gone").symlink_to(tmp_path / "runs" / "missing")  # inside, dangling
    with pytest.raises(ConfigError, match="^run.name=gone: .*gone is a symbolic link to a "
                                          "missing .*missing$"):
        preflight(config(tmp_path, "run.name=gone"))


def test_the_existing_run_dirs_checkpoints_must_be_a_directory(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match=r"^checkpoint.dir=.*/runs/r/checkpoints: a file, not"):
        preflight(config(tmp_path, "run.name=r"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 555 directory")
def test_a_read_only_directory_as_a_user(tmp_path):
    (tmp_path / "runs").mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=r"^run.dir=.*: cannot write in .*Permission denied"):
        preflight(config(tmp_path))


INSIDE = "must name a directory inside run.dir"


@pytest.mark.parametrize("override, expected", [
    ("run.name=/abs/x", f"run.name=/abs/x: {INSIDE} (a relative path without '..' parts)"),
    ("run.name=a/../../b", f"run.name=a/../../b: {INSIDE} (a relative path without '..' parts)"),
    ("run.name=..", f"run.name=..: {INSIDE} (a relative path without '..' parts)"),
    ("run.name=.", f"run.name=.: {INSIDE} (use run.dir to choose the parent)"),
    ("run.name=./", f"run.name=./: {INSIDE} (use run.dir to choose the parent)"),
    ('run.name="a\\nb"', "run.name='a\\nb': control characters are not allowed"),
])
def test_run_name_must_stay_inside_run_dir(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, override)
    assert str(err.value) == expected
