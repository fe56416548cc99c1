"""A small EC2 instance metadata service (IMDSv2 only) on 127.0.0.1, for tests.

One server stands in for the metadata service of many instances: the first path segment names
the instance (http://127.0.0.1:PORT/<instance-id>/latest/...), so a pool configured with
cloud.imds_url=http://127.0.0.1:PORT/{instance_id} gives each watcher its own instance.

  PUT /<id>/latest/api/token        needs X-aws-ec2-metadata-token-ttl-seconds (1..21600);
                                    answers a token valid for that many seconds
  GET /<id>/latest/meta-data/...    needs X-aws-ec2-metadata-token with a valid token, else 401
      spot/instance-action          404, or {"action": ..., "time": ...} after interrupt(id)
      events/recommendations/rebalance   404, or {"noticeTime": ...} after rebalance(id)
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTION = "latest/meta-data/spot/instance-action"
REBALANCE = "latest/meta-data/events/recommendations/rebalance"


def _iso(after_s: float) -> str:
    at = datetime.now(timezone.utc) + timedelta(seconds=after_s)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


class ImdsServer:
    def __init__(self) -> None:
        self.tokens: dict[str, float] = {}  # token -> expiry (time.monotonic())
        self.documents: dict[tuple[str, str], str] = {}  # (instance id, path) -> body
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, carried a valid token)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _answer(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _split(self) -> tuple[str, str]:
                instance, _, rest = self.path.lstrip("/").partition("/")
                return (instance, rest) if instance.startswith("i-") else ("", self.path[1:])

            def do_PUT(self) -> None:
                instance, rest = self._split()
                server._log("PUT", self.path, False)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if rest != "latest/api/token":
                    return self._answer(404)
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._answer(400)
                token = secrets.token_urlsafe(24)
                with server.lock:
                    server.tokens[token] = time.monotonic() + int(ttl)
                self._answer(200, token)

            def do_GET(self) -> None:
                instance, rest = self._split()
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                with server.lock:
                    valid = server.tokens.get(token, 0) > time.monotonic()
                    body = server.documents.get((instance, rest))
                server._log("GET", self.path, valid)
                if not valid:
                    return self._answer(401)
                if body is None:
                    return self._answer(404)
                self._answer(200, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _log(self, method: str, path: str, valid: bool) -> None:
        with self.lock:
            self.requests.append((method, path, valid))

    def __enter__(self) -> ImdsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- what the tests do to an instance
    def interrupt(self, instance: str = "", action: str = "terminate", in_s: float = 120) -> None:
        """EC2 schedules the instance's interruption in_s seconds from now."""
        doc = json.dumps({"action": action, "time": _iso(in_s)})
        with self.lock:
            self.documents[(instance, ACTION)] = doc

    def rebalance(self, instance: str = "") -> None:
        with self.lock:
            self.documents[(instance, REBALANCE)] = json.dumps({"noticeTime": _iso(0)})

    def revoke_tokens(self) -> None:
        """Every token expires now (as after its TTL)."""
        with self.lock:
            self.tokens.clear()

    def gets(self, instance: str = "") -> list[tuple[str, str, bool]]:
        """GET requests made for this instance (all instances with instance=None)."""
        prefix = f"/{instance}/" if instance else "/"
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and r[1].startswith(prefix)]
