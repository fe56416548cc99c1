"""CheckpointStore against real files in tmp_path and a real moto S3 server over HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import numpy as np
import pytest
import torch
from moto_server import fake_aws_env, moto_server

from orchestrator import checkpoint as ckpt
from orchestrator.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    InvalidCheckpointError,
    capture_rng_state,
    parse_uri,
    plain_to_rng_state,
    restore_rng_state,
    rng_state_to_plain,
)

LOGGER = "orchestrator.checkpoint"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        yield url


class RawFiles:
    """Direct access to the stored files, bypassing the store, to tamper with them."""

    def __init__(self, backend: str, tmp_path, endpoint: str | None) -> None:
        self.backend = backend
        if backend == "local":
            self.root = tmp_path / "ckpt"
            self.uri = str(self.root)
        else:
            self.bucket = f"b-{uuid.uuid4().hex[:12]}"
            self.s3 = boto3.client("s3", endpoint_url=endpoint)
            self.s3.create_bucket(Bucket=self.bucket)
            self.uri = f"s3://{self.bucket}/runs/r1"

    def names(self) -> list[str]:
        if self.backend == "local":
            return sorted(p.name for p in self.root.iterdir())
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="runs/r1/")
        names = sorted(o["Key"].rsplit("/", 1)[1] for o in page.get("Contents", []))
        return [n for n in names if n != "WRITER"]  # the location's writer (S3 only)

    def read(self, name: str) -> bytes:
        if self.backend == "local":
            return (self.root / name).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=f"runs/r1/{name}")["Body"].read()

    def write(self, name: str, data: bytes) -> None:
        if self.backend == "local":
            (self.root / name).write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=f"runs/r1/{name}", Body=data)

    def delete(self, name: str) -> None:
        if self.backend == "local":
            (self.root / name).unlink()
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=f"runs/r1/{name}")


@pytest.fixture(params=["local", "s3"])
def raw(request, tmp_path, monkeypatch, endpoint) -> RawFiles:
    """Stored files of a fresh store location, on local disk and on S3 (moto over HTTP)."""
    fake_aws_env(monkeypatch)
    monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", endpoint)  # how the store finds moto
    return RawFiles(request.param, tmp_path, endpoint)


def small_state(seed: int) -> dict:
    return {"w": torch.full((3,), float(seed)), "step": seed}


def save_steps(store: CheckpointStore, *steps: int) -> None:
    for s in steps:
        store.save(s, small_state(s), {"note": f"step {s}"})


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- round trip


def _model_and_optimizers(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    return model, sgd, adam


def _train_step(model, sgd, adam, gen: torch.Generator) -> None:
    x = torch.randn(5, 4, generator=gen)
    sgd.zero_grad()
    adam.zero_grad()
    model(x).pow(2).sum().backward()
    sgd.step()
    adam.step()


def _draws(gen: torch.Generator, np_legacy, np_pcg, np_mt) -> list:
    return [
        random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist(),
        torch.rand(3, generator=gen).tolist(), np_legacy.rand(2).tolist(),
        np_pcg.random(2).tolist(), np_mt.integers(0, 1 << 30, 2).tolist(),
    ]


def test_round_trip_restores_tensors_optimizers_and_rng(raw):
    model, sgd, adam = _model_and_optimizers(0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        _train_step(model, sgd, adam, gen)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np_legacy = np.random.RandomState(4)
    np_pcg, np_mt = np.random.default_rng(5), np.random.Generator(np.random.MT19937(6))
    random.random()  # cached gaussian and partly used states are part of what must survive
    random.gauss(0, 1)
    np_legacy.randn()

    state = {
        "model": model.state_dict(),
        "sgd": sgd.state_dict(),
        "adam": adam.state_dict(),
        "rng": capture_rng_state(),
        "gen": gen.get_state(),
        "np_legacy": rng_state_to_plain(np_legacy.get_state()),
        "np_pcg": rng_state_to_plain(np_pcg.bit_generator.state),
        "np_mt": rng_state_to_plain(np_mt.bit_generator.state),
        "plain": {"epoch": 2, "lr": 0.05, "hist": [1.5, 2.5], "name": "run", "pair": (1, (2, 3))},
    }
    store = CheckpointStore(raw.uri)
    uri = store.save(12, state, {"config": {"lr": 0.1}, "seed": 0})
    assert uri.endswith("ckpt-000000012.pt") and raw.uri.rstrip("/") in uri
    expected = _draws(gen, np_legacy, np_pcg, np_mt)

    loaded = CheckpointStore(raw.uri).load_latest()  # a fresh store object, as after a restart
    assert isinstance(loaded, Checkpoint)
    assert loaded.step == 12 and loaded.manifest == {"config": {"lr": 0.1}, "seed": 0}
    got = loaded.state
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["plain"] == state["plain"] and isinstance(got["plain"]["pair"][1], tuple)

    # Restored RNG states give the same draws as the originals did right after the save.
    restore_rng_state(got["rng"])
    gen2 = torch.Generator()
    gen2.set_state(got["gen"])
    legacy2 = np.random.RandomState()
    legacy2.set_state(plain_to_rng_state(got["np_legacy"]))
    pcg2, mt2 = np.random.default_rng(), np.random.Generator(np.random.MT19937())
    pcg2.bit_generator.state = plain_to_rng_state(got["np_pcg"])
    mt2.bit_generator.state = plain_to_rng_state(got["np_mt"])
    assert _draws(gen2, legacy2, pcg2, mt2) == expected

    # Restored optimizers (momentum buffers, Adam moments and step) continue identically.
    model2, sgd2, adam2 = _model_and_optimizers(99)
    model2.load_state_dict(got["model"])
    sgd2.load_state_dict(got["sgd"])
    adam2.load_state_dict(got["adam"])
    assert "momentum_buffer" in got["sgd"]["state"][0] and "exp_avg" in got["adam"]["state"][0]
    _train_step(model, sgd, adam, torch.Generator().manual_seed(11))
    _train_step(model2, sgd2, adam2, torch.Generator().manual_seed(11))
    pairs = zip(model.parameters(), model2.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_manifest_file_contents(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(5, small_state(5), {"config": {"model": "mlp"}, "rng": {"seed": 3}})
    data = (tmp_path / "ckpt-000000005.pt").read_bytes()
    doc = json.loads((tmp_path / "ckpt-000000005.json").read_text())
    assert doc["step"] == 5 and doc["format"] == ckpt.FORMAT_VERSION
    assert doc["size"] == len(data) and doc["sha256"] == hashlib.sha256(data).hexdigest()
    created = datetime.fromisoformat(doc["created"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)
    assert doc["manifest"] == {"config": {"model": "mlp"}, "rng": {"seed": 3}}


def test_saving_a_step_again_replaces_it(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(2, small_state(1), {"v": 1})
    store.save(2, small_state(9), {"v": 2})
    got = store.load(2)
    assert torch.equal(got.state["w"], torch.full((3,), 9.0)) and got.manifest == {"v": 2}


# --------------------------------------------------------------------------- validity


def test_newest_valid_is_chosen(raw):
    store = CheckpointStore(raw.uri, keep=5)
    save_steps(store, 1, 3, 2)
    assert store.steps() == [1, 2, 3]
    latest = store.load_latest()
    assert latest.step == 3 and latest.state["step"] == 3


def test_empty_store_has_nothing_to_load(raw):
    store = CheckpointStore(raw.uri)
    assert store.steps() == [] and store.load_latest() is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate", "truncated"),
        ("flip", "sha256 mismatch"),
        ("garbage_manifest", "manifest is not valid JSON"),
        ("drop_data", "data file missing"),
        ("drop_manifest", "manifest missing"),
    ],
)
def test_damaged_newest_is_skipped_with_warning(raw, caplog, damage, reason):
    store = CheckpointStore(raw.uri, keep=5)
    save_steps(store, 1, 2)
    data, manifest = "ckpt-000000002.pt", "ckpt-000000002.json"
    original = raw.read(data)
    if damage == "truncate":
        raw.write(data, original[: len(original) // 2])
    elif damage == "flip":
        mid = len(original) // 2
        raw.write(data, original[:mid] + bytes([original[mid] ^ 0xFF]) + original[mid + 1 :])
        assert len(raw.read(data)) == len(original)
    elif damage == "garbage_manifest":
        raw.write(manifest, b'{"step": 2, "sha2')
    elif damage == "drop_data":
        raw.delete(data)
    else:
        raw.delete(manifest)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        latest = store.load_latest()
    assert latest is not None and latest.step == 1
    assert torch.equal(latest.state["w"], torch.full((3,), 1.0))
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and data in msgs[0] and reason in msgs[0], msgs
    with pytest.raises(InvalidCheckpointError, match=reason):
        store.load(2)


def test_manifest_of_another_step_is_rejected(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path))
    save_steps(store, 1, 2)
    # A manifest copied over from another step must not vouch for this step's data.
    (tmp_path / "ckpt-000000002.json").write_bytes((tmp_path / "ckpt-000000001.json").read_bytes())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_latest().step == 1
    assert "manifest says step 1" in warnings_of(caplog)[0]


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_object_is_rejected_not_executed(raw, tmp_path, caplog):
    store = CheckpointStore(raw.uri)
    save_steps(store, 1)
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({"model": _Payload(str(marker))}, buf)
    data = buf.getvalue()
    # The manifest vouches for these exact bytes: only weights_only loading stands in the way.
    raw.write("ckpt-000000002.pt", data)
    raw.write("ckpt-000000002.json", ckpt._build_manifest(2, data, {}))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        latest = store.load_latest()
    assert latest.step == 1
    assert not marker.exists()
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "weights_only" in msgs[0] and "ckpt-000000002.pt" in msgs[0]
    with pytest.raises(CheckpointError):
        store.load(2)
    assert not marker.exists()


def test_save_refuses_state_that_weights_only_cannot_load(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\[1\].*rng_state_to_plain"):
        store.save(1, {"rng": np.random.RandomState(0).get_state()}, {})
    with pytest.raises(CheckpointError, match="_Payload"):
        store.save(1, {"x": [_Payload("/nonexistent")]}, {})
    assert store.steps() == [] and os.listdir(tmp_path) == []


def test_save_refuses_manifest_that_is_not_json(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"manifest\['config'\]\['path'\].*JSON"):
        store.save(1, small_state(1), {"config": {"path": tmp_path}})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- retention


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_keeps_exactly_keep(raw, keep):
    store = CheckpointStore(raw.uri, keep=keep)
    save_steps(store, 10, 20, 30, 40, 50)
    kept = [50, 40][:keep][::-1]
    assert store.steps() == kept
    assert raw.names() == sorted(f"ckpt-{s:09d}.{e}" for s in kept for e in ("json", "pt"))
    assert [store.load(s).step for s in kept] == kept


def test_retention_drops_incomplete_older_and_keeps_newer(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    save_steps(store, 1, 2, 9)
    (tmp_path / "ckpt-000000002.json").unlink()  # step 2 is now an incomplete leftover
    store.save(3, small_state(3), {})
    # Up to step 3 the complete ones are 3 and 1; the incomplete 2 goes; step 9 (newer than
    # the step just saved, e.g. from a run resumed from an earlier point) is left alone.
    assert store.steps() == [1, 3, 9]
    assert not (tmp_path / "ckpt-000000002.pt").exists()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match="keep"):
        CheckpointStore(str(tmp_path), keep=0)


# --------------------------------------------------------------------------- atomicity


def test_failure_between_data_and_manifest_keeps_previous(tmp_path, monkeypatch, caplog):
    store = CheckpointStore(str(tmp_path))
    save_steps(store, 1)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk vanished")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk vanished"):
        store.save(2, small_state(2), {})
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-000000001.json", "ckpt-000000001.pt", "ckpt-000000002.pt"]  # temp file cleaned
    assert store.steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_latest().step == 1
    assert "manifest missing" in warnings_of(caplog)[0]


_CRASH_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from orchestrator.checkpoint import CheckpointStore

    root, crash_on = sys.argv[1], sys.argv[2]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(crash_on):
            os._exit(17)  # the process dies here: no cleanup, no exception handlers
        real_replace(src, dst)

    os.replace = replace
    CheckpointStore(root).save(2, {"w": torch.zeros(1000)}, {})
    """
)


@pytest.mark.parametrize("crash_on", [".pt", ".json"])
def test_hard_crash_mid_save_leaves_previous_checkpoint(tmp_path, caplog, crash_on):
    store = CheckpointStore(str(tmp_path))
    save_steps(store, 1)
    child = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(tmp_path), crash_on],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 17, child.stderr

    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".ckpt-000000002{crash_on}")
    # The temp file is never taken for a checkpoint.
    assert store.steps() == ([1] if crash_on == ".pt" else [1, 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        latest = store.load_latest()
    assert latest.step == 1 and torch.equal(latest.state["w"], torch.full((3,), 1.0))

    # The next save sweeps the stray temp file and the incomplete step.
    store.save(3, small_state(3), {})
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-000000001.json", "ckpt-000000001.pt", "ckpt-000000003.json", "ckpt-000000003.pt"]


# --------------------------------------------------------------------------- S3 specifics


def test_missing_bucket_is_one_line_error(endpoint, monkeypatch):
    fake_aws_env(monkeypatch)
    bucket = f"nope-{uuid.uuid4().hex[:8]}"
    with pytest.raises(CheckpointError) as err:
        CheckpointStore(f"s3://{bucket}/x", endpoint_url=endpoint)
    assert str(err.value) == f"checkpoint.dir=s3://{bucket}/x: bucket '{bucket}' does not exist"


def test_endpoint_argument_and_env(endpoint, monkeypatch):
    fake_aws_env(monkeypatch)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    store = CheckpointStore(f"s3://{bucket}", endpoint_url=endpoint)  # the argument wins
    assert store.save(1, small_state(1), {}) == f"s3://{bucket}/ckpt-000000001.pt"
    monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", endpoint)
    assert CheckpointStore(f"s3://{bucket}/").load_latest().step == 1


def test_credentials_never_reach_the_store(raw, monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = CheckpointStore(raw.uri)
    save_steps(store, 1)
    for name in raw.names():
        assert secret.encode() not in raw.read(name)
        assert b"AWS_" not in raw.read(name)


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b/", ("s3", "bucket", "a/b")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("S3://bucket//x", ("s3", "bucket", "x")),
        ("/tmp/ck", ("file", "/tmp/ck", "")),
        ("file:///tmp/ck", ("file", "/tmp/ck", "")),
        ("rel/dir", ("file", os.path.abspath("rel/dir"), "")),
    ],
)
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


def test_parse_uri_errors():
    with pytest.raises(CheckpointError) as err:
        parse_uri("gs://bucket/x")
    assert str(err.value) == (
        "checkpoint.dir: unsupported scheme 'gs://'; valid: local path, s3://bucket/prefix")
    with pytest.raises(CheckpointError, match="no bucket"):
        parse_uri("s3:///x")
    with pytest.raises(CheckpointError, match="empty"):
        parse_uri("  ")


def test_local_dir_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create directory"):
        CheckpointStore(str(f))


def test_unreachable_endpoint_and_missing_credentials_are_one_line_errors(endpoint, monkeypatch):
    fake_aws_env(monkeypatch)
    unreachable = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(CheckpointError, match="^checkpoint.dir=s3://b/x: Could not conn") as err:
        CheckpointStore("s3://b/x", endpoint_url=unreachable)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CheckpointError, match="no AWS credentials found"):
        CheckpointStore("s3://b/x", endpoint_url=endpoint)


# --------------------------------------------------------------------------- S3 writes
@pytest.fixture
def s3_raw(tmp_path, monkeypatch, endpoint) -> RawFiles:
    fake_aws_env(monkeypatch)
    monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", endpoint)
    return RawFiles("s3", tmp_path, endpoint)


def test_s3_checkpoints_carry_sha256_and_go_multipart_above_the_part_size(s3_raw):
    """A small checkpoint: one object whose S3-side SHA-256 is that of its bytes. One above
    checkpoint.part_mb: a multipart upload (ETag '-<parts>'), each part checksummed; it
    loads back equal."""
    store = CheckpointStore(s3_raw.uri, part_mb=5)
    store.save(1, small_state(1), {})
    key = "runs/r1/ckpt-000000001.pt"
    small = s3_raw.s3.head_object(Bucket=s3_raw.bucket, Key=key, ChecksumMode="ENABLED")
    body = s3_raw.s3.get_object(Bucket=s3_raw.bucket, Key=key)["Body"].read()
    assert small["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    big = {"w": torch.arange(3_000_000, dtype=torch.float32)}  # 12 MB: 3 parts of 5 MiB
    store.save(2, big, {})
    head = s3_raw.s3.head_object(Bucket=s3_raw.bucket, Key="runs/r1/ckpt-000000002.pt",
                                 ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3") and head["ChecksumSHA256"]
    assert torch.equal(CheckpointStore(s3_raw.uri).load_latest().state["w"], big["w"])
    assert not s3_raw.s3.list_multipart_uploads(Bucket=s3_raw.bucket).get("Uploads")


def test_a_second_driver_on_one_s3_location_stops_the_first(s3_raw):
    """Driver B starts on A's location (a resume, or a mistake): B takes it over; A's next
    checkpoint is refused by the conditional write, before it writes or prunes anything."""
    a = CheckpointStore(s3_raw.uri, keep=1)
    save_steps(a, 1)
    b = CheckpointStore(s3_raw.uri, keep=1)
    save_steps(b, 2)
    with pytest.raises(CheckpointError, match="another driver took this checkpoint location "
                       "over"):
        save_steps(a, 3)
    save_steps(b, 4)
    assert CheckpointStore(s3_raw.uri).load_latest().step == 4
