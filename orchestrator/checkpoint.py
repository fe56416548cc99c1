"""Checkpoint store: training state to a local directory or to s3://bucket/prefix.

Layout, per checkpoint:
    ckpt-{step:09d}.pt    torch.save of the state dict (loaded back with weights_only=True)
    ckpt-{step:09d}.json  manifest: step, sha256 and size of the .pt, created, format, and the
                          caller's manifest under "manifest"; written last, it marks completion.

Local writes go through a temporary file in the same directory (fsync, os.replace, fsync of the
directory); S3 writes are one PUT of the finished bytes. A reader trusts a checkpoint only when
its manifest parses, the data file's size and sha256 match it, and torch.load with
weights_only=True accepts the data; load_latest() skips anything else with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENDPOINT_ENV = "SQUALL_S3_ENDPOINT_URL"
DEFAULT_PART_MB = 64  # S3: larger checkpoints go up in multipart uploads of parts this size
WRITER = "WRITER"  # S3: the object that names the driver writing a location

_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.(pt|json)$")
_TMP_MARK = ".tmp-"  # temporary files are ".{final name}.tmp-{random}"; never match _NAME_RE
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class CheckpointError(Exception):
    """A checkpoint store problem, with a one-line message."""


class InvalidCheckpointError(CheckpointError):
    """One checkpoint is incomplete or corrupt (load_latest skips these)."""


@dataclass
class Checkpoint:
    step: int
    state: dict
    manifest: dict  # the caller's manifest, as passed to save()


# --------------------------------------------------------------------------- URIs


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a checkpoint location into (scheme, bucket_or_dir, prefix).

    "s3://bucket/a/b/" -> ("s3", "bucket", "a/b"); "/some/dir" or "file:///some/dir" ->
    ("file", "/some/dir", ""). Any other scheme raises CheckpointError.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise CheckpointError("checkpoint.dir: empty; valid: local path, s3://bucket/prefix")
    uri = uri.strip()
    m = _SCHEME_RE.match(uri)
    scheme = m.group(1).lower() if m else "file"
    if scheme == "s3":
        bucket, _, prefix = uri[m.end():].partition("/")
        if not bucket:
            raise CheckpointError(f"checkpoint.dir={uri}: no bucket name; expected s3://bucket/prefix")
        return "s3", bucket, "/".join(p for p in prefix.split("/") if p)
    if scheme == "file":
        path = uri[m.end():] if m else uri
        return "file", os.path.abspath(os.path.expanduser(path)), ""
    raise CheckpointError(
        f"checkpoint.dir: unsupported scheme '{m.group(1)}://'; valid: local path, s3://bucket/prefix"
    )


def check_location(uri: str, endpoint_url: str | None = None) -> tuple[str, str]:
    """The cheap part of opening a store, for checks before a run starts: the URI parses, and
    for s3:// credentials are found and the bucket answers a one-key listing (two attempts,
    short timeouts). Returns parse_uri's (scheme, bucket_or_dir); local paths are left to the
    caller (nothing is created here). CheckpointError with a one-line message."""
    scheme, where, prefix = parse_uri(uri)
    if scheme == "s3":
        endpoint = endpoint_url if endpoint_url is not None else os.environ.get(ENDPOINT_ENV)
        _S3Backend(uri.strip(), where, prefix, endpoint or None, attempts=2, connect_timeout=5)
    return scheme, where


def _file_name(step: int, ext: str) -> str:
    return f"ckpt-{step:09d}.{ext}"


# --------------------------------------------------------------------------- backends


@dataclass
class _Entry:
    name: str
    size: int
    mtime: float  # seconds since the epoch


class _Backend(Protocol):
    def list(self) -> list[_Entry]: ...
    def read(self, name: str) -> bytes | None: ...  # None when the file does not exist
    def write(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...
    def uri(self, name: str) -> str: ...


class _LocalBackend:
    def __init__(self, uri: str, root: str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"checkpoint.dir={uri}: cannot create directory: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CheckpointError(f"checkpoint.dir={uri}: directory is not writable")

    def list(self) -> list[_Entry]:
        entries = []
        with os.scandir(self.root) as it:
            for d in it:
                try:
                    if d.is_file(follow_symlinks=False):
                        st = d.stat(follow_symlinks=False)
                        entries.append(_Entry(d.name, st.st_size, st.st_mtime))
                except FileNotFoundError:  # removed while listing
                    pass
        return entries

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Atomic: temp file in the same directory, fsync, rename over the final name, fsync dir."""
        tmp = self.root / f".{name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fsync_dir()

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:  # platforms that cannot open directories
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


class _S3Backend:
    def __init__(self, uri: str, bucket: str, prefix: str, endpoint_url: str | None,
                 attempts: int = 5, connect_timeout: float = 10,
                 part_mb: int = DEFAULT_PART_MB) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        self.label, self.bucket, self.prefix = uri, bucket, prefix
        self.part_bytes = part_mb * 2**20
        self.writer, self.writer_etag = uuid.uuid4().hex, None
        cfg = Config(retries={"max_attempts": attempts, "mode": "standard"},
                     connect_timeout=connect_timeout)
        # Own session: credentials resolved now, not cached in boto3's shared default session.
        try:  # a missing AWS_PROFILE or a malformed ~/.aws/config fails here
            self.s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)
        except (BotoCoreError, ValueError) as e:
            raise self._error(e, "client") from e
        self._call(self.s3.list_objects_v2, Bucket=bucket, Prefix=self._key(""), MaxKeys=1)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        """Run one S3 call, turning boto errors into one-line CheckpointErrors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, fn.__name__) from e

    def _error(self, e: Exception, op: str) -> CheckpointError:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                msg = f"bucket '{self.bucket}' does not exist"
            elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                msg = f"access denied ({code}); check the AWS credentials and bucket policy"
            else:
                msg = f"S3 {op} failed: {code or type(e).__name__}"
        elif isinstance(e, NoCredentialsError):
            msg = "no AWS credentials found (boto3 default chain: env, ~/.aws, instance role)"
        else:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return CheckpointError(f"checkpoint.dir={self.label}: {msg}")

    def list(self) -> list[_Entry]:
        entries, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self._key(""), "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.s3.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self._key("")):]
                entries.append(_Entry(name, int(obj["Size"]), obj["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return entries
            token = page["NextContinuationToken"]

    def read(self, name: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(name))
            with obj["Body"] as body:
                return body.read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise self._error(e, "get_object") from e
        except BotoCoreError as e:
            raise self._error(e, "get_object") from e

    def write(self, name: str, data: bytes) -> None:
        """One object with an S3-side SHA-256 checksum (S3 refuses bytes that do not match
        it); above part_bytes a multipart upload with a checksum per part, so that no object
        is limited to put_object's 5 GiB and a failed part is not the whole state again."""
        self.claim()  # stops here if another driver took this location over
        key = self._key(name)
        if len(data) <= self.part_bytes:
            self._call(self.s3.put_object, Bucket=self.bucket, Key=key, Body=data,
                       ChecksumAlgorithm="SHA256")
            return
        upload = self._call(self.s3.create_multipart_upload, Bucket=self.bucket, Key=key,
                            ChecksumAlgorithm="SHA256")["UploadId"]
        try:
            parts = [self._part(key, upload, number, data[start:start + self.part_bytes])
                     for number, start in enumerate(range(0, len(data), self.part_bytes), 1)]
            self._call(self.s3.complete_multipart_upload, Bucket=self.bucket, Key=key,
                       UploadId=upload, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):  # no parts left behind, billed
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

    def _part(self, key: str, upload: str, number: int, chunk: bytes) -> dict:
        reply = self._call(self.s3.upload_part, Bucket=self.bucket, Key=key, UploadId=upload,
                           PartNumber=number, Body=chunk, ChecksumAlgorithm="SHA256")
        return {"PartNumber": number, "ETag": reply["ETag"],
                "ChecksumSHA256": reply["ChecksumSHA256"]}

    def claim(self) -> None:
        """Hold this location as its one writer: the first write takes it over (a resumed
        run takes over from its dead predecessor), every later one checks, with a
        conditional write on the WRITER object, that nobody took it over since. Two drivers
        on one location: the older one stops at its next checkpoint with a one-line error
        instead of pruning or overwriting the other's checkpoints."""
        from botocore.exceptions import ClientError

        body = json.dumps({"writer": self.writer, "at": time.time()}).encode()
        key = self._key(WRITER)
        if self.writer_etag is None:  # take over: whoever held it last
            head = self._head(key)
            condition = {"IfMatch": head} if head else {"IfNoneMatch": "*"}
        else:
            condition = {"IfMatch": self.writer_etag}
        try:
            reply = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise CheckpointError(
                    f"checkpoint.dir={self.label}: another driver took this checkpoint "
                    "location over (two runs writing one location?); this one stops "
                    "writing to it") from None
            raise self._error(e, "put_object") from e
        self.writer_etag = reply["ETag"]

    def _head(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(e, "head_object") from e

    def delete(self, name: str) -> None:
        self._call(self.s3.delete_object, Bucket=self.bucket, Key=self._key(name))

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"


# --------------------------------------------------------------------------- payload checks

# Types torch.load(weights_only=True) accepts; save() refuses anything else up front, so that a
# checkpoint never turns out to be unloadable only when a run tries to resume from it.
_ALLOWED_LEAVES = (
    type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device,
)
_ALLOWED_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)


def _check_weights_only(obj: Any, path: str = "state") -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _ALLOWED_LEAVES:
        return
    if type(obj) not in _ALLOWED_CONTAINERS:
        hint = "; convert it with rng_state_to_plain()" if type(obj).__module__ == "numpy" else ""
        raise CheckpointError(
            f"{path}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded back "
            f"with torch.load(weights_only=True){hint}"
        )
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_weights_only(k, f"{path} key {k!r}")
            _check_weights_only(v, f"{path}[{k!r}]")
    else:
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{path}[{i}]")


def _check_json(obj: Any, path: str = "manifest") -> None:
    """Raise CheckpointError naming the first value json.dumps would reject."""
    if obj is None or type(obj) in (bool, int, float, str):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool) and k is not None:
                raise CheckpointError(f"{path}: key {k!r} is not JSON-serializable")
            _check_json(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json(v, f"{path}[{i}]")
    else:
        raise CheckpointError(
            f"{path}: {type(obj).__qualname__} is not JSON-serializable (checkpoint manifest)"
        )


def _build_manifest(step: int, data: bytes, manifest: dict) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "step": step,
        "data": _file_name(step, "pt"),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "manifest": manifest,
    }
    return json.dumps(doc, indent=2).encode()


def _parse_manifest(raw: bytes, step: int) -> dict:
    """The manifest document, or InvalidCheckpointError saying what is wrong with it."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpointError(f"manifest is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise InvalidCheckpointError("manifest is not a JSON object")
    if doc.get("format") != FORMAT_VERSION:
        raise InvalidCheckpointError(f"unknown manifest format {doc.get('format')!r}")
    if doc.get("step") != step:
        raise InvalidCheckpointError(f"manifest says step {doc.get('step')!r}")
    size, sha = doc.get("size"), doc.get("sha256")
    if type(size) is not int or not isinstance(sha, str) or type(doc.get("manifest")) is not dict:
        raise InvalidCheckpointError("manifest lacks size, sha256 or manifest fields")
    return doc


def _torch_load(data: bytes) -> dict:
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # any failure here means "not loadable"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        detail = re.sub(r"\x1b\[[0-9;]*m", "", detail)[:200]
        raise InvalidCheckpointError(
            f"torch.load(weights_only=True) refused it ({type(e).__name__}: {detail})"
        ) from e
    if not isinstance(state, dict):
        raise InvalidCheckpointError(f"data holds a {type(state).__name__}, not a dict")
    return state


# --------------------------------------------------------------------------- the store


class CheckpointStore:
    """Checkpoints under a local directory or s3://bucket/prefix, keeping the newest `keep`."""

    def __init__(self, uri: str, keep: int = 3, endpoint_url: str | None = None,
                 part_mb: int = DEFAULT_PART_MB) -> None:
        if type(keep) is not int or keep < 1:
            raise CheckpointError(f"checkpoint.keep={keep!r}: must be an integer >= 1")
        scheme, where, prefix = parse_uri(uri)
        self.uri, self.keep = uri, keep
        self._backend: _Backend
        if scheme == "s3":
            endpoint = endpoint_url if endpoint_url is not None else os.environ.get(ENDPOINT_ENV)
            self._backend = _S3Backend(uri, where, prefix, endpoint or None, part_mb=part_mb)
        else:
            self._backend = _LocalBackend(uri, where)

    # ---- writing

    def save(self, step: int, state: dict, manifest: dict) -> str:
        """Write checkpoint `step` (data, then manifest), prune old ones; returns the data's URI."""
        if type(step) is not int or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
        if not isinstance(state, dict) or not isinstance(manifest, dict):
            raise CheckpointError("checkpoint state and manifest must be dicts")
        _check_weights_only(state)
        _check_json(manifest)
        started = time.time()

        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        meta = _build_manifest(step, data, manifest)

        data_name, meta_name = _file_name(step, "pt"), _file_name(step, "json")
        # When a step is saved again, never pair its old manifest with the new data.
        self._backend.delete(meta_name)
        self._backend.write(data_name, data)
        self._backend.write(meta_name, meta)
        self._prune(step, started)
        return self._backend.uri(data_name)

    def _prune(self, step: int, started: float) -> None:
        """Keep the newest `keep` complete checkpoints up to `step`; drop older and stray files.

        "Complete" is judged from the listing (both files, size as in the manifest) rather than
        by reading every kept checkpoint back. Steps newer than `step` are left alone.
        """
        entries = self._backend.list()
        by_step: dict[int, dict[str, _Entry]] = collections.defaultdict(dict)
        for e in entries:
            m = _NAME_RE.match(e.name)
            if m:
                by_step[int(m.group(1))][m.group(2)] = e
            elif e.name.startswith(".ckpt-") and _TMP_MARK in e.name and e.mtime < started:
                self._backend.delete(e.name)  # temp file left by an earlier crash

        kept = {step}
        for s in sorted((s for s in by_step if s < step), reverse=True):
            if len(kept) == self.keep:
                break
            if self._looks_complete(s, by_step[s]):
                kept.add(s)
        for s, files in by_step.items():
            if s < step and s not in kept:  # too old, or an incomplete leftover
                # Manifest first: a half-deleted pair then reads as incomplete, not as valid.
                for ext in ("json", "pt"):
                    if ext in files:
                        self._backend.delete(files[ext].name)

    def _looks_complete(self, step: int, files: dict[str, _Entry]) -> bool:
        if "pt" not in files or "json" not in files:
            return False
        raw = self._backend.read(files["json"].name)
        try:
            doc = _parse_manifest(raw or b"", step)
        except InvalidCheckpointError:
            return False
        return doc["size"] == files["pt"].size

    # ---- reading

    def steps(self) -> list[int]:
        """Steps that have a checkpoint file (complete or not), ascending."""
        found = {int(m.group(1)) for e in self._backend.list() if (m := _NAME_RE.match(e.name))}
        return sorted(found)

    def load(self, step: int) -> Checkpoint:
        """Load and verify checkpoint `step`; InvalidCheckpointError if it is not valid."""
        data_name, meta_name = _file_name(step, "pt"), _file_name(step, "json")
        try:
            raw = self._backend.read(meta_name)
            if raw is None:
                raise InvalidCheckpointError("manifest missing (save did not complete)")
            doc = _parse_manifest(raw, step)
            data = self._backend.read(data_name)
            if data is None:
                raise InvalidCheckpointError("data file missing")
            if len(data) != doc["size"]:
                raise InvalidCheckpointError(
                    f"size {len(data)} bytes, manifest says {doc['size']} (truncated?)"
                )
            digest = hashlib.sha256(data).hexdigest()
            if digest != doc["sha256"]:
                raise InvalidCheckpointError(
                    f"sha256 mismatch (file {digest[:12]}..., manifest {doc['sha256'][:12]}...)"
                )
            state = _torch_load(data)
        except InvalidCheckpointError as e:
            raise InvalidCheckpointError(f"checkpoint {self._backend.uri(data_name)}: {e}") from e
        return Checkpoint(step=step, state=state, manifest=doc["manifest"])

    def load_latest(self) -> Checkpoint | None:
        """The newest valid checkpoint, skipping invalid ones with a warning; None if there is
        none at all. Checkpoints that are all invalid raise InvalidCheckpointError: starting
        over would overwrite the run's history."""
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return self.load(step)
            except InvalidCheckpointError as e:
                if i == len(steps) - 1:
                    raise InvalidCheckpointError(
                        f"{e}; none of the {len(steps)} checkpoint(s) of {self.uri} can be "
                        "read: move them away to start the run over") from e
                log.warning("%s; skipping it, falling back to the previous checkpoint", e)
        return None


# --------------------------------------------------------------------------- RNG states

_NDARRAY_TAG = "__ndarray__"


def rng_state_to_plain(state: Any) -> Any:
    """Make an RNG state storable under weights_only: numpy arrays become tagged lists.

    Works on np.random.get_state() / RandomState.get_state() tuples and on
    Generator.bit_generator.state dicts; tuples, dicts, ints and tensors pass through.
    """
    if isinstance(state, np.ndarray):
        return {_NDARRAY_TAG: state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, np.generic):
        return state.item()
    if isinstance(state, dict):
        return {k: rng_state_to_plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(rng_state_to_plain(v) for v in state)
    return state


def plain_to_rng_state(plain: Any) -> Any:
    """Inverse of rng_state_to_plain."""
    if isinstance(plain, dict):
        if set(plain) == {_NDARRAY_TAG, "dtype"}:
            return np.asarray(plain[_NDARRAY_TAG], dtype=plain["dtype"])
        return {k: plain_to_rng_state(v) for k, v in plain.items()}
    if isinstance(plain, (list, tuple)):
        return type(plain)(plain_to_rng_state(v) for v in plain)
    return plain


def capture_rng_state() -> dict:
    """The process-global RNG states (Python, NumPy, torch CPU and CUDA), storable as-is."""
    state = {
        "python": random.getstate(),
        "numpy": rng_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what capture_rng_state() returned (CUDA only when both sides have it)."""
    random.setstate(state["python"])
    np.random.set_state(plain_to_rng_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
