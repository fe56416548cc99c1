"""data.root on object storage: s3://bucket/prefix copied to a local cache on each node.

Every process that calls a data factory with an s3:// root (each worker, and the driver for
the test split) first brings the node's copy up to date: objects missing locally or changed
since (by ETag) are downloaded, to a temporary name renamed into place, under a file lock so
that the workers of one node download once. A spot node that joins later fetches its own
copy. The endpoint comes from SQUALL_S3_ENDPOINT_URL (as for checkpoints), credentials from
boto3's default chain.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from orchestrator.checkpoint import ENDPOINT_ENV, CheckpointError, check_location, parse_uri
from orchestrator.config import ConfigError

MANIFEST = ".squall-sync.json"  # key -> ETag of the copies made


def local_root(root: str, cache: str) -> str:
    """The local directory a data factory reads: `root` itself, or the synced copy of an
    s3:// root under `cache`."""
    if not root.startswith("s3://"):
        return os.path.expanduser(root)
    try:
        _, bucket, prefix = parse_uri(root)
        check_location(root)  # credentials, bucket: one-line errors
    except CheckpointError as e:
        raise ConfigError(str(e).replace("checkpoint.dir", "data.root", 1)) from None
    target = Path(os.path.expanduser(cache)) / bucket / prefix
    sync(bucket, prefix, target)
    return str(target)


def _client():  # noqa: ANN202 - a boto3 client
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_ENV)
                                          or None)


def sync(bucket: str, prefix: str, target: Path) -> int:
    """Download the objects under bucket/prefix that `target` lacks or holds an older
    version of; returns how many were downloaded."""
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".squall-sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait for it
        manifest_path = target / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        s3, fetched = _client(), 0
        for key, etag in _objects(s3, bucket, prefix):
            relative = key[len(prefix):].lstrip("/") if prefix else key
            path = target / relative
            if not relative or relative.endswith("/") or ".." in Path(relative).parts:
                continue  # folder markers; keys that would leave the cache
            if manifest.get(relative) == etag and path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            s3.download_file(bucket, key, str(partial))
            os.replace(partial, path)
            manifest[relative] = etag
            fetched += 1
        manifest_path.write_text(json.dumps(manifest))
    return fetched


def _objects(s3, bucket: str, prefix: str) -> list[tuple[str, str]]:  # noqa: ANN001
    """(key, ETag) of every object under the prefix."""
    out, token = [], None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        if token:
            kwargs["ContinuationToken"] = token
        page = s3.list_objects_v2(**kwargs)
        out += [(o["Key"], o["ETag"]) for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]
