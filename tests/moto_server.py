"""A real moto AWS API server on 127.0.0.1 (free port) for tests that talk to S3, EC2, ...

Usage in a test module:

    from moto_server import fake_aws_env, moto_server

    @pytest.fixture(scope="module")
    def endpoint():
        with moto_server() as url:
            yield url

    def test_x(endpoint, monkeypatch):
        fake_aws_env(monkeypatch)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="b")

The server keeps state for its lifetime: use unique resource names per test, or
call reset_moto(url).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """moto's threaded server bound to 127.0.0.1 on a port the OS picks."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> str:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self.endpoint_url

    def stop(self) -> None:
        self._server.stop()


@contextmanager
def moto_server() -> Iterator[str]:
    """Run a moto server for the duration of the block; yields its endpoint URL."""
    server = MotoServer()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def fake_aws_env(monkeypatch) -> None:
    """Fake credentials and region for boto3, with no real AWS profile or proxy in the way."""
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def reset_moto(endpoint_url: str) -> None:
    """Make the server forget every resource it holds."""
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(request, timeout=10):
        pass
