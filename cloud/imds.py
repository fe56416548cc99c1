"""The interruption watcher of a spot instance: polls the instance metadata service (IMDSv2).

Every request carries a session token (PUT /latest/api/token with a TTL header first); IMDSv1
(a GET without a token) is never used. Two documents matter:
  /latest/meta-data/spot/instance-action             404 until EC2 schedules the interruption,
                                                      then {"action": "terminate", "time": ...}
  /latest/meta-data/events/recommendations/rebalance  404 until the instance is at elevated
                                                      risk, then {"noticeTime": ...}
This module has no Ray in it; cloud/aws.py runs a Watcher as a small actor on each worker node.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_S = 21600  # the longest IMDS allows (6 h)


class ImdsClient:
    """IMDSv2 reads: a session token first, then GETs that carry it (a fresh token on 401)."""

    def __init__(self, url: str, token_ttl_s: int = TOKEN_TTL_S, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.token_ttl_s, self.timeout_s = token_ttl_s, timeout_s
        self._token, self._token_until = "", 0.0
        # The metadata service is link-local: never through an HTTP proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _new_token(self) -> str:
        request = urllib.request.Request(
            self.url + TOKEN_PATH, method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)})
        with self._opener.open(request, timeout=self.timeout_s) as response:
            self._token = response.read().decode()
        self._token_until = time.monotonic() + self.token_ttl_s - 60
        return self._token

    def get(self, path: str) -> str | None:
        """The document at path, or None where IMDS answers 404 (nothing to report)."""
        for attempt in range(2):
            token = self._token if time.monotonic() < self._token_until else self._new_token()
            request = urllib.request.Request(self.url + path,
                                             headers={"X-aws-ec2-metadata-token": token})
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code != 401 or attempt:
                    raise
                self._token_until = 0.0  # the token expired or was revoked: get another
        return None


def check(client: ImdsClient, rebalance: bool = True) -> dict | None:
    """One look at the metadata service: a notice dict, or None.

    {"kind": "interruption", "action": "terminate", "time": "2026-...Z"} or
    {"kind": "rebalance", "time": "2026-...Z"} (only with rebalance=True)."""
    doc = client.get(ACTION_PATH)
    if doc:
        action = json.loads(doc)
        return {"kind": "interruption", "action": action.get("action", "terminate"),
                "time": action.get("time", "")}
    if rebalance:
        doc = client.get(REBALANCE_PATH)
        if doc:
            return {"kind": "rebalance", "time": json.loads(doc).get("noticeTime", "")}
    return None


class Watcher:
    """Polls IMDS every poll_s seconds; watch() returns the first notice it sees."""

    def __init__(self, url: str, poll_s: float = 5.0, rebalance: bool = True) -> None:
        self.client, self.poll_s, self.rebalance = ImdsClient(url), poll_s, rebalance

    def watch(self) -> dict:
        while True:
            try:
                notice = check(self.client, self.rebalance)
            except (OSError, ValueError) as e:  # IMDS unreachable or a garbled answer: retry
                log.warning("instance metadata service at %s: %s", self.client.url, e)
                notice = None
            if notice is not None:
                return notice
            time.sleep(self.poll_s)
