"""cloud=aws: EC2 spot instances that join the driver's Ray cluster (boto3 only).

The driver runs on the Ray head node (an on-demand machine). For each machine the pool makes
one instant EC2 Fleet request (create_fleet Type=instant, one instance) over every
cloud.instance_types x cloud.subnets pool, with cloud.allocation (default
price-capacity-optimized: EC2 takes the cheapest of the pools least likely to be
interrupted). The fleet launches from the job's launch template (created at the first launch,
tagged squall:job=<run.name>, deleted with the job): one version per machine carries its user
data and tags. Capacity errors come back per pool in the reply's Errors; a request with no
instance is tried again in cloud.launch_rounds rounds with doubling backoff, then the launch
fails with one clear error. The instance's user data runs `ray start --address=<head>` with a
resource named after the instance ({"squall_node_<key>": 1}): its worker asks for part of that
resource, so it lands on that instance and nowhere else. The other part goes to a Watcher actor
(cloud/imds.py) that polls the instance metadata service (IMDSv2) and returns when a spot
interruption notice or a rebalance recommendation arrives; poll() hands that machine to the job
in PollResult.noticed (the job drains its worker), leaves that instance's (type, subnet) pool
out of later requests (unless no other pool has capacity), asks for a replacement, and
terminates the drained instance at the next poll. With cloud.fallback=on_demand a machine that
finds no spot capacity is launched on demand (an on-demand instant fleet).
Every instance is tagged squall:job=<run.name>; shutdown() and `squall cloud cleanup
run.name=...` find the job's instances by that tag, terminate them (one by one when EC2 fails the
batch for an id it does not know) and verify that they are going. Launch calls retry transient
EC2 errors with one ClientToken per logical call; a replacement that has not joined Ray after
cloud.join_timeout_s is terminated and another asked for; the user data shuts the instance down
(so it is terminated) when Ray ends on it, i.e. when the head is gone.

Spot price history (describe_spot_price_history, paginated) prices every machine per second for
the run's cost, and `squall cloud prices ... out=FILE` writes it as a trace for cloud=simulated.

With cloud.local_nodes=true (tests: moto cannot boot anything) each launched instance gets a
local Ray node with the instance's resource, in a ray.cluster_utils.Cluster like
cloud/simulated.py, and each watcher polls cloud.imds_url with {instance_id} filled in.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import logging
import os
import random
import re
import shlex
import signal
import socket
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import ray
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from ray.cluster_utils import Cluster
from ray.exceptions import RayError

from cloud.config import AwsCloudConfig, JobSpec
from cloud.imds import Watcher
from cloud.pool import Machine, PollResult, Pool, join_cluster
from cloud.traces import write_trace
from conf.schema import ConfigError

log = logging.getLogger(__name__)

JOB_TAG = "squall:job"
NODE_TAG = "squall:node"
WORKER_SHARE = 0.5  # of the instance's resource; the watcher takes the rest
# Errors that say "not this type/zone now" (a fleet reply's Errors, per pool): another pool,
# else another round.
CAPACITY_ERRORS = {
    "InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "InsufficientFreeAddressesInSubnet", "Unsupported", "UnfulfillableCapacity",
}
# Errors that say "try the same request again in a moment": retried in place with backoff and
# the same ClientToken (cloud.api_retries); when they persist, the round ends.
TRANSIENT_ERRORS = {
    "InternalError", "InternalFailure", "Unavailable", "ServiceUnavailable",
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "EC2ThrottledException", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
}
TRANSIENT_EXCEPTIONS = (ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                        ReadTimeoutError)
NOT_FOUND_ERRORS = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
GONE_STATES = {"shutting-down", "terminated"}
NO_CREDENTIALS = ("cloud=aws: no AWS credentials found (boto3 default chain: environment, "
                  "~/.aws, instance role)")

RemoteWatcher = ray.remote(num_cpus=0)(Watcher)
Choice = tuple[str, str | None]  # a spot pool: (instance type, subnet id or None: EC2 picks)


class AwsError(ConfigError):
    """An AWS call that failed for good; one line for the terminal (no credentials in it)."""


class NoSpotCapacity(AwsError):
    """No (type, subnet) choice had spot capacity in any round."""


@dataclass
class Instance:
    id: str
    instance_type: str
    zone: str
    key: str  # the Ray resource that names the instance's node
    subnet: str | None = None
    joined: bool = False  # its Ray node is in the cluster
    gpus: float = 0.0  # the GPUs its Ray node declares, once it joined
    node: Any = None  # the local stand-in Ray node (cloud.local_nodes)
    watcher: Any = None  # the Watcher actor on it


# --------------------------------------------------------------------------- EC2 calls
class Ec2:
    """The few EC2 calls the adapter makes. Credentials come only from boto3's default chain."""

    def __init__(self, cloud: AwsCloudConfig) -> None:
        session = boto3.session.Session(region_name=cloud.region or None)
        if not session.region_name:
            raise AwsError("cloud=aws: no region; set cloud.region=us-east-1 (or "
                           "$AWS_DEFAULT_REGION)")
        self.region = session.region_name
        endpoint = cloud.endpoint_url or None
        self.client = session.client("ec2", endpoint_url=endpoint, config=BotoConfig(
            retries={"mode": "standard", "total_max_attempts": 5}))
        # Launch calls are retried by _retried() itself, with one ClientToken.
        self.launcher = session.client("ec2", endpoint_url=endpoint, config=BotoConfig(
            retries={"mode": "standard", "total_max_attempts": 1}))
        self.templates: dict[str, str] = {}  # job -> its launch template's id
        self.zones: dict[str | None, str] = {}  # subnet -> its availability zone

    def _call(self, operation: str, client: Any = None, **kwargs: Any) -> dict:
        try:
            return getattr(client or self.client, operation)(**kwargs)
        except NoCredentialsError:
            raise AwsError(NO_CREDENTIALS) from None
        except BotoCoreError as e:
            raise AwsError(f"cloud=aws: {operation}: {e}") from None

    def _pages(self, operation: str, **kwargs: Any) -> list[dict]:
        """Every page of a paginated call."""
        try:
            return list(self.client.get_paginator(operation).paginate(**kwargs))
        except ClientError as e:
            raise AwsError(f"cloud=aws: {operation}: {_describe(e)}") from None
        except NoCredentialsError:
            raise AwsError(NO_CREDENTIALS) from None
        except BotoCoreError as e:
            raise AwsError(f"cloud=aws: {operation}: {e}") from None

    def subnets(self, wanted: list[str]) -> list[tuple[str | None, str]]:
        """(subnet id, zone) to launch in: the configured subnets, else the default VPC's."""
        try:
            if wanted:
                found = self._call("describe_subnets", SubnetIds=wanted)["Subnets"]
            else:
                found = self._call("describe_subnets", Filters=[
                    {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        except ClientError as e:
            raise AwsError(f"cloud.subnets={wanted}: {_describe(e)}") from None
        pairs = sorted((s["SubnetId"], s["AvailabilityZone"]) for s in found)
        self.zones.update(pairs)
        return pairs or [(None, "")]  # no default VPC subnets: EC2 picks

    # ---- launches: one instant EC2 Fleet request per machine, from the job's launch template
    def launch(self, tags: dict[str, str], user_data: str, choices: list[Choice],
               cloud: AwsCloudConfig, rounds: int, groups: Sequence[str] = (),
               avoid: Collection[Choice] = ()) -> dict:
        """One spot instance from an instant EC2 Fleet over the (type, subnet) choices, placed
        by cloud.allocation; the pools in `avoid` (a notice or a replacement that never joined
        there) are asked for only when no other pool has capacity. After cloud.launch_rounds
        rounds with doubling backoff, NoSpotCapacity. Returns the instance dict (InstanceId,
        InstanceType, SubnetId, Placement.AvailabilityZone)."""
        template = self.template_version(tags, user_data, cloud, groups)
        tiers = [pools for pools in ([c for c in choices if c not in avoid],
                                     [c for c in choices if c in avoid]) if pools]
        last = ""
        for round_ in range(rounds):
            if round_:
                time.sleep(cloud.retry_backoff_s * 2 ** (round_ - 1))
            for pools in tiers:
                info, last = self._fleet(template, tags, pools, cloud, "spot")
                if info is not None:
                    return info
        types = ", ".join(dict.fromkeys(t for t, _ in choices))
        raise NoSpotCapacity(
            f"cloud=aws: no spot capacity for {types} in {len(choices)} type/subnet choices "
            f"after cloud.launch_rounds={rounds} (last: {last}); try more cloud.instance_types "
            "or cloud.subnets, a higher cloud.bid, or cloud.fallback=on_demand")

    def launch_on_demand(self, tags: dict[str, str], user_data: str, choices: list[Choice],
                         cloud: AwsCloudConfig, groups: Sequence[str] = ()) -> dict:
        """cloud.fallback=on_demand: one on-demand instance, one instant fleet over every
        choice (EC2 takes the lowest on-demand price that has capacity)."""
        template = self.template_version(tags, user_data, cloud, groups)
        info, last = self._fleet(template, tags, choices, cloud, "on-demand")
        if info is None:
            raise AwsError(f"cloud=aws: no spot and no on-demand capacity in {len(choices)} "
                           f"type/subnet choices (last: {last})")
        return info

    def template_version(self, tags: dict[str, str], user_data: str, cloud: AwsCloudConfig,
                         groups: Sequence[str] = ()) -> dict:
        """The LaunchTemplateSpecification of one machine: a new version of the job's launch
        template (created at the job's first launch, tagged squall:job=<job>, deleted with
        the job) with the machine's user data and tags and the instances' settings."""
        data = template_data(tags, user_data, cloud, list(groups))
        job = tags.get(JOB_TAG, "")
        try:
            if job in self.templates:
                version = self._retried("create_launch_template_version", cloud,
                                        LaunchTemplateId=self.templates[job],
                                        LaunchTemplateData=data)["LaunchTemplateVersion"]
                return {"LaunchTemplateId": self.templates[job],
                        "Version": str(version["VersionNumber"])}
            labels = {"TagSpecifications": [{"ResourceType": "launch-template", "Tags": [
                {"Key": JOB_TAG, "Value": job}]}]} if job else {}
            created = self._retried("create_launch_template", cloud, LaunchTemplateData=data,
                                    LaunchTemplateName=template_name(job),
                                    **labels)["LaunchTemplate"]
        except ClientError as e:
            raise AwsError(f"cloud=aws: launch template of {JOB_TAG}={job}: "
                           f"{_describe(e)}") from None
        self.templates[job] = created["LaunchTemplateId"]
        return {"LaunchTemplateId": created["LaunchTemplateId"],
                "Version": str(created["LatestVersionNumber"])}

    def _fleet(self, template: dict, tags: dict[str, str], pools: list[Choice],
               cloud: AwsCloudConfig, market: str) -> tuple[dict | None, str]:
        """(the instance dict, '') of one instant fleet request over these pools, or (None,
        what failed) when it returned no instance for capacity (its per-pool Errors) or a
        transient error that outlived the retries; any other error raises."""
        try:
            reply = self._retried("create_fleet", cloud,
                                  **fleet_request(template, tags, pools, cloud, market))
        except ClientError as e:
            if _code(e) not in TRANSIENT_ERRORS:
                raise AwsError(f"cloud=aws: create_fleet: {_describe(e)}") from None
            return None, f"create_fleet: {_code(e)}"
        errors = reply.get("Errors") or []
        failed = "; ".join(f"{_pool_name(e)}: {e.get('ErrorCode', '?')}" for e in errors)
        info = self._launched(reply)
        if info is not None:
            if failed:  # EC2 placed it in another pool
                log.info("%s instance %s in %s; no capacity in %s", market, info["InstanceId"],
                         _pool_name(info), failed)
            return info, ""
        for error in errors:
            if error.get("ErrorCode") not in CAPACITY_ERRORS | TRANSIENT_ERRORS:
                raise AwsError(f"cloud=aws: create_fleet {_pool_name(error)}: "
                               f"{error.get('ErrorCode')}: {error.get('ErrorMessage', '')}"
                               .splitlines()[0][:300])
        log.info("no %s capacity: %s", market, failed or "no instance and no error")
        return None, failed or "no instance and no error"

    def _launched(self, reply: dict) -> dict | None:
        """The instance an instant fleet reply names, as an instance dict; None if none."""
        for item in reply.get("Instances") or []:
            if not item.get("InstanceIds"):
                continue
            override = item.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
            subnet = item.get("SubnetId") or override.get("SubnetId")
            zone = (item.get("AvailabilityZone") or override.get("AvailabilityZone")
                    or self.zones.get(subnet, ""))
            return {"InstanceId": item["InstanceIds"][0], "SubnetId": subnet,
                    "InstanceType": item.get("InstanceType") or override.get("InstanceType"),
                    "Placement": {"AvailabilityZone": zone}, "Lifecycle": item.get("Lifecycle")}
        return None

    def _retried(self, operation: str, cloud: AwsCloudConfig, **request: Any) -> dict:
        """One logical call (create_fleet, create_launch_template[_version]), retried after a
        transient error (up to cloud.api_retries times, backoff from cloud.api_backoff_s
        doubling, with jitter) with one ClientToken, so that a retry of a request EC2 did
        carry out (its reply lost) returns that result instead of doing it twice. A
        ClientError that is not transient, or still is after the retries, is raised."""
        token = f"squall-{uuid.uuid4().hex}"  # <= 64 ASCII characters
        for attempt in range(cloud.api_retries + 1):
            try:
                return getattr(self.launcher, operation)(ClientToken=token, **request)
            except ClientError as e:
                if _code(e) not in TRANSIENT_ERRORS or attempt == cloud.api_retries:
                    raise
                why = _describe(e)
            except TRANSIENT_EXCEPTIONS as e:
                if attempt == cloud.api_retries:
                    raise AwsError(f"cloud=aws: {operation}: {e} (after {attempt + 1} "
                                   "attempts)") from None
                why = str(e)
            except NoCredentialsError:
                raise AwsError(NO_CREDENTIALS) from None
            except BotoCoreError as e:
                raise AwsError(f"cloud=aws: {operation}: {e}") from None
            delay = min(60.0, cloud.api_backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.info("%s: %s; retrying in %.1f s (ClientToken %s)", operation, why, delay, token)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def delete_job_templates(self, job: str) -> tuple[list[str], dict[str, str]]:
        """Delete the launch templates tagged squall:job=<job>; (deleted, {id: why} left)."""
        found = [t["LaunchTemplateId"] for page in self._pages(
            "describe_launch_templates", Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [job]}])
            for t in page["LaunchTemplates"]]
        deleted, left = [], {}
        for template in found:
            try:
                self.client.delete_launch_template(LaunchTemplateId=template)
                deleted.append(template)
            except ClientError as e:
                left[template] = _describe(e)
            except BotoCoreError as e:
                left[template] = str(e)
        if self.templates.get(job) in deleted:
            del self.templates[job]
        return deleted, left

    def terminate(self, ids: list[str]) -> dict[str, str]:
        """Terminate these instances. One id EC2 does not know (a stale id, or one it does not
        list yet right after launch) fails the whole batch call: then each id is terminated on
        its own, so the others still go. Returns {id: error} of those that could not be
        terminated, unknown ids not included (the tag search finds them once EC2 lists them)."""
        ids = sorted(set(ids))
        if not ids:
            return {}
        try:
            self._call("terminate_instances", InstanceIds=ids)
            return {}
        except ClientError as e:
            if len(ids) == 1:
                if _code(e) in NOT_FOUND_ERRORS:
                    log.info("terminate_instances %s: %s", ids[0], _describe(e))
                    return {}
                return {ids[0]: _describe(e)}
            log.info("terminate_instances (%d ids): %s; terminating them one by one", len(ids),
                     _describe(e))
        failed: dict[str, str] = {}
        for one in ids:
            try:
                failed.update(self.terminate([one]))
            except AwsError as e:
                failed[one] = str(e)
        return failed

    def states(self, ids: list[str]) -> dict[str, str]:
        """The state name of each of these instances that EC2 knows (an instance-id filter:
        unknown ids are left out instead of failing the call)."""
        found: dict[str, str] = {}
        ids = sorted(set(ids))
        for i in range(0, len(ids), 200):  # at most 200 values per filter
            pages = self._pages("describe_instances", Filters=[
                {"Name": "instance-id", "Values": ids[i:i + 200]}])
            found.update({d["InstanceId"]: d["State"]["Name"] for page in pages
                          for r in page["Reservations"] for d in r["Instances"]})
        return found

    def vpc(self, subnet: str | None) -> str:
        """The VPC of a subnet (None: the default VPC, where EC2 then launches)."""
        if subnet:
            found = self._call("describe_subnets", SubnetIds=[subnet])["Subnets"]
            return found[0]["VpcId"]
        vpcs = self._call("describe_vpcs", Filters=[{"Name": "isDefault",
                                                     "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise AwsError("cloud.create_security_group=true: no default VPC; give "
                           "cloud.subnets")
        return vpcs[0]["VpcId"]

    def create_cluster_group(self, job: str, vpc: str, head_ip: str, ssh_cidr: str) -> str:
        """A security group, tagged with the job, that admits only its own members, the Ray
        head (head_ip) and SSH from ssh_cidr; its id."""
        try:
            group = self.client.create_security_group(
                GroupName=f"squall-{job}-{uuid.uuid4().hex[:8]}", VpcId=vpc,
                Description=f"squall {job}: the cluster's members and its head only",
                TagSpecifications=[{"ResourceType": "security-group",
                                    "Tags": [{"Key": JOB_TAG, "Value": job}]}])["GroupId"]
            rules = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}]
            if head_ip:
                rules.append({"IpProtocol": "-1", "IpRanges": [
                    {"CidrIp": f"{head_ip}/32", "Description": "the Ray head"}]})
            if ssh_cidr:
                rules.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                              "IpRanges": [{"CidrIp": ssh_cidr, "Description": "SSH"}]})
            self.client.authorize_security_group_ingress(GroupId=group, IpPermissions=rules)
        except ClientError as e:
            raise AwsError(f"cloud.create_security_group=true: {_describe(e)}") from None
        except (NoCredentialsError, BotoCoreError) as e:
            raise AwsError(f"cloud=aws: create_security_group: {e}") from None
        return group

    def delete_job_groups(self, job: str, attempts: int = 6, wait_s: float = 5.0
                          ) -> tuple[list[str], dict[str, str]]:
        """Delete the security groups tagged with the job; one still used by an instance
        that is shutting down is tried again (attempts, wait_s apart). Returns (deleted,
        {id: why} of those left)."""
        groups = [g["GroupId"] for page in self._pages("describe_security_groups", Filters=[
            {"Name": f"tag:{JOB_TAG}", "Values": [job]}]) for g in page["SecurityGroups"]]
        deleted, left = [], {}
        for group in groups:
            for attempt in range(attempts):
                try:
                    self.client.delete_security_group(GroupId=group)
                    deleted.append(group)
                    left.pop(group, None)
                    break
                except ClientError as e:
                    left[group] = _code(e)
                    if _code(e) != "DependencyViolation":
                        break
                    time.sleep(wait_s * (attempt < attempts - 1))
        return deleted, left

    def terminate_job(self, job: str, known: list[str] = (), verify_s: float = 0.0
                      ) -> tuple[list[str], dict[str, str]]:
        """Terminate every instance of the job: those tagged squall:job=<job> in a live state,
        and the `known` ids (launched by this driver, maybe not listed by the tag yet); then
        describe them again to verify they are shutting down or terminated, once more trying
        those that are not. Returns (ids that are going, {id: why} of those that are not)."""
        ids = set(known)
        try:
            ids.update(self.find(job))
        except AwsError as e:  # terminate at least what this driver knows
            log.warning("%s; terminating the %d instance(s) this driver launched", e, len(ids))
        if not ids:
            return [], {}
        failed = self.terminate(sorted(ids))
        left: dict[str, str] = {}
        for attempt in range(2):
            try:
                states = self.states(sorted(ids))
                late = set(self.find(job)) - ids  # listed by the tag only now
            except AwsError as e:
                return sorted(ids - set(failed)), {**failed, **{i: str(e) for i in ids
                                                               if i not in failed}}
            if late:
                ids |= late
                failed.update(self.terminate(sorted(late)))
                states.update(self.states(sorted(late)))
            left = {i: failed.get(i, f"still {state}") for i, state in states.items()
                    if state not in GONE_STATES}
            if not left or attempt:
                break
            time.sleep(verify_s)
            failed = self.terminate(sorted(left))
        unknown = sorted(i for i in ids if i not in states)
        if unknown:
            log.info("EC2 does not know %s (never launched, or long gone)", " ".join(unknown))
        gone = sorted(i for i in ids if i in states and i not in left)
        return gone, left

    def find(self, job: str) -> list[str]:
        """Ids of the instances tagged squall:job=<job> that are not terminated."""
        pages = self._pages("describe_instances", Filters=[
            {"Name": f"tag:{JOB_TAG}", "Values": [job]},
            {"Name": "instance-state-name", "Values": LIVE_STATES}])
        return sorted(i["InstanceId"] for page in pages for r in page["Reservations"]
                      for i in r["Instances"])

    def price_history(self, types: list[str], start: datetime, zone: str = "",
                      page_size: int = 1000) -> list[dict]:
        """Linux spot prices since start, in the row layout of cloud/traces.py, oldest first."""
        query: dict[str, Any] = {"InstanceTypes": list(types), "StartTime": start,
                                 "ProductDescriptions": ["Linux/UNIX"]}
        if zone:
            query["AvailabilityZone"] = zone
        pages = self._pages("describe_spot_price_history", **query,
                            PaginationConfig={"PageSize": page_size})
        rows = [{"Timestamp": p["Timestamp"].astimezone(timezone.utc).isoformat(),
                 "AvailabilityZone": p["AvailabilityZone"], "InstanceType": p["InstanceType"],
                 "ProductDescription": p["ProductDescription"], "SpotPrice": p["SpotPrice"]}
                for page in pages for p in page["SpotPriceHistory"]
                if not zone or p["AvailabilityZone"] == zone]
        return sorted(rows, key=lambda r: (r["InstanceType"], r["AvailabilityZone"],
                                           r["Timestamp"]))


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def _describe(error: ClientError) -> str:
    message = error.response.get("Error", {}).get("Message", "")
    return f"{_code(error)}: {message}".splitlines()[0][:300]


class SpotPrices:
    """Spot price history as step functions per (instance type, zone), in wall-clock time."""

    def __init__(self, rows: list[dict]) -> None:
        self.series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for row in rows:  # sorted by type, zone, time
            times, prices = self.series.setdefault(
                (row["InstanceType"], row["AvailabilityZone"]), ([], []))
            times.append(datetime.fromisoformat(row["Timestamp"]).timestamp())
            prices.append(float(row["SpotPrice"]))

    def price(self, instance_type: str, zone: str, at: float) -> float | None:
        """$/h at wall time `at` (the zone's series, else the type's cheapest zone)."""
        keys = [(instance_type, zone)] if (instance_type, zone) in self.series else [
            k for k in self.series if k[0] == instance_type]
        found = []
        for key in keys:
            times, prices = self.series[key]
            found.append(prices[max(bisect.bisect_right(times, at) - 1, 0)])
        return min(found) if found else None


def template_data(tags: dict[str, str], user_data: str, cloud: AwsCloudConfig,
                  groups: list[str]) -> dict:
    """One machine's launch template data: its user data and tags, and the settings every
    instance gets (image, IMDSv2 only, terminate on shutdown, role, groups, public IP or
    not). The type and subnet come from the fleet's overrides."""
    data: dict[str, Any] = {
        "ImageId": cloud.ami,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},  # IMDSv2
        "InstanceInitiatedShutdownBehavior": "terminate",
    }
    if user_data:  # a template takes it base64-encoded (run_instances encodes it itself)
        data["UserData"] = base64.b64encode(user_data.encode()).decode()
    if tags:
        data["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [
            {"Key": k, "Value": v} for k, v in tags.items()]}]
    if cloud.instance_profile:  # the instances' own role (e.g. to read the Ray token)
        key = "Arn" if cloud.instance_profile.startswith("arn:") else "Name"
        data["IamInstanceProfile"] = {key: cloud.instance_profile}
    if not cloud.public_ip:  # a network interface without a public address
        nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": False}
        if groups:
            nic["Groups"] = groups
        data["NetworkInterfaces"] = [nic]
    elif groups:
        data["SecurityGroupIds"] = groups
    return data


def fleet_request(template: dict, tags: dict[str, str], pools: list[Choice],
                  cloud: AwsCloudConfig, market: str) -> dict:
    """create_fleet's arguments for one instance (market "spot" or "on-demand") from the
    template version, in any of these (type, subnet) pools. The instance's tags are in the
    template and, as an instant fleet allows, in the request too: terminate-by-tag and
    cleanup rely on them."""
    overrides = []
    for instance_type, subnet in pools:
        override = {"InstanceType": instance_type}
        if subnet:
            override["SubnetId"] = subnet
        if market == "spot" and cloud.bid:
            override["MaxPrice"] = f"{cloud.bid:g}"
        overrides.append(override)
    request: dict[str, Any] = {
        "Type": "instant",
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": template,
                                   "Overrides": overrides}],
        "TargetCapacitySpecification": {"TotalTargetCapacity": 1,
                                        "DefaultTargetCapacityType": market},
    }
    if tags:
        request["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [
            {"Key": k, "Value": v} for k, v in tags.items()]}]
    if market == "spot":
        request["SpotOptions"] = {"AllocationStrategy": cloud.allocation,
                                  "InstanceInterruptionBehavior": "terminate"}
    else:
        request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
    return request


def template_name(job: str) -> str:
    """A launch template name of the job (unique: a crashed run's template may be left)."""
    stem = re.sub(r"[^A-Za-z0-9().\-/_]", "-", job)[:80] or "job"
    return f"squall-{stem}-{uuid.uuid4().hex[:8]}"


def _pool_name(item: dict) -> str:
    """'<type> in <subnet>' of a fleet reply's instance or error (or an instance dict)."""
    override = item.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
    instance_type = item.get("InstanceType") or override.get("InstanceType", "?")
    return f"{instance_type} in {item.get('SubnetId') or override.get('SubnetId') or 'any subnet'}"


# Reads the Ray token from SSM Parameter Store with the instance's own role (boto3 is there:
# the image has squall); prints nothing else, so that the shell captures the token alone.
TOKEN_READER = ("import boto3, sys; print(boto3.client('ssm', region_name=sys.argv[2])"
                ".get_parameter(Name=sys.argv[1], WithDecryption=True)['Parameter']['Value'])")


def user_data(setup: list[str], head: str, key: str, token_parameter: str = "",
              region: str = "") -> str:
    """An instance's boot script: the setup lines, then (token_parameter) Ray's token
    authentication with the token read from SSM by the instance's role, then join the head
    with its resource and stay in the cluster (--block) until Ray ends on it; then, or when a
    setup line fails, the instance shuts down, and being launched with
    InstanceInitiatedShutdownBehavior=terminate it is terminated: no instance outlives its
    head. The token itself is never in the user data."""
    resources = json.dumps({key: 1})
    auth = ["export RAY_AUTH_MODE=token",
            f"RAY_AUTH_TOKEN=\"$(python3 -c {shlex.quote(TOKEN_READER)} "
            f"{shlex.quote(token_parameter)} {shlex.quote(region)})\"",
            "export RAY_AUTH_TOKEN"] if token_parameter else []
    return "\n".join(["#!/bin/bash", "# squall worker node: joins the Ray head; the driver then",
                      "# places this node's worker and its interruption watcher on it",
                      "# when Ray stops here (the head is gone) or setup fails: terminate",
                      "trap 'shutdown -h now' EXIT",
                      "set -e", *setup, *auth,
                      f"ray start --block --address={shlex.quote(head)} "
                      f"--resources={shlex.quote(resources)}",
                      "shutdown -h now"]) + "\n"


def setup_lines(cloud: AwsCloudConfig) -> list[str]:
    """cloud.setup, then the lines of cloud.setup_file, then those of $SQUALL_SETUP: the last
    two are read here, at launch, and stored nowhere (config.yaml and checkpoints show
    cloud.setup redacted, and never hold the others)."""
    lines = list(cloud.setup)
    if cloud.setup_file:
        try:
            with open(os.path.expanduser(cloud.setup_file)) as f:
                lines += f.read().splitlines()
        except OSError as e:
            raise ConfigError(f"cloud.setup_file={cloud.setup_file}: cannot read it "
                              f"({e.strerror or e})") from None
    lines += os.environ.get("SQUALL_SETUP", "").splitlines()
    return lines


# --------------------------------------------------------------------------- the pool
class AwsPool(Pool):
    cloud: AwsCloudConfig

    def __init__(self, cloud: AwsCloudConfig, job: JobSpec) -> None:
        super().__init__(cloud, job)
        if not cloud.ami:
            raise ConfigError("cloud=aws needs cloud.ami: an image with Python, Ray and squall "
                              "installed (see docs/aws.md)")
        if not job.run_name:
            raise ConfigError("cloud=aws needs run.name: the instances are tagged "
                              "squall:job=<run.name> (and `squall cloud cleanup` finds them so)")
        self.setup = setup_lines(cloud)  # cloud.setup_file and $SQUALL_SETUP: read once, here
        self.ec2 = Ec2(cloud)
        self.cluster: Cluster | None = None
        self.head = cloud.head_address
        self.instances: dict[str, Instance] = {}  # started and not yet terminated
        self.choices: list[Choice] = []  # every (type, subnet) pool, in configured order
        self.avoid: set[Choice] = set()  # pools asked for only when the others have no room
        self.prices = SpotPrices([])
        self._prices_at = -float("inf")
        self._watching: dict[ray.ObjectRef, Machine] = {}
        self._draining: list[Machine] = []
        self._running = False  # after start(): a failed replacement is retried, not fatal
        self._failures = 0
        self._node_keys: dict[str, float] | None = None  # live nodes: resource -> GPUs
        self.groups: list[str] = list(cloud.security_groups)  # the instances' groups

    def start(self, n: int) -> list[Machine]:
        if self.cloud.local_nodes and ray.is_initialized():
            raise ConfigError("cloud.local_nodes=true starts its own Ray cluster; call it without "
                              "a Ray session already running")
        self._refresh_prices()
        subnets = self.ec2.subnets(self.cloud.subnets)
        self.choices = [(t, s) for t in self.cloud.instance_types for s, _ in subnets]
        machines = super().start(n)
        self._running = True
        return machines

    def _connect(self) -> None:
        if self.cloud.local_nodes:
            self.workers_here = True
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": self.job.ray.dashboard})
            ray.init(address=self.cluster.address, logging_level=logging.WARNING,
                     log_to_driver=False, runtime_env=self.job.ray.runtime_env())
        else:  # the driver runs on the head node of the cluster the instances join
            address = self.job.ray.address or os.environ.get("RAY_ADDRESS") or "auto"
            try:
                join_cluster(self.job.ray, address)
            except ConfigError as e:
                raise ConfigError(f"cloud=aws: {e}; the driver runs on the head node of the "
                                  "cluster the instances join") from None
        self.head = self.head or ray.get_runtime_context().gcs_address

    # ---- instances
    def _provision(self, machine: Machine) -> None:
        c = self.cloud
        key = f"squall_node_{uuid.uuid4().hex[:12]}"
        tags = {JOB_TAG: self.job.run_name, NODE_TAG: key,
                "Name": f"squall-{self.job.run_name}-{machine.id}"}
        rounds = 1 if self._running else c.launch_rounds
        if c.create_security_group and len(self.groups) == len(c.security_groups):
            self._create_group()  # at the first launch: the head's address is known by now
        script = user_data(self.setup, self.head, key, c.auth_token_parameter, self.ec2.region)
        try:
            info = self.ec2.launch(tags, script, self.choices, c, rounds, self.groups,
                                   self.avoid)
            machine.market = "spot"  # also for a lost on-demand machine's replacement
        except NoSpotCapacity as e:
            if c.fallback != "on_demand":
                raise
            log.warning("%s; launching on demand (cloud.fallback=on_demand)", e)
            info = self.ec2.launch_on_demand(tags, script, self.choices, c, self.groups)
            machine.market = "on_demand"  # billed at the on-demand price, never reclaimed
        instance = Instance(info["InstanceId"], info["InstanceType"],
                            info.get("Placement", {}).get("AvailabilityZone", ""), key,
                            info.get("SubnetId"))
        self.instances[instance.id] = machine.node = instance
        log.info("machine %d: %s instance %s (%s, %s)", machine.id, machine.market,
                 instance.id, instance.instance_type, instance.zone)
        if c.local_nodes:
            instance.node = self.cluster.add_node(
                num_cpus=max(1, round(self.job.worker_num_cpus)), resources={key: 1},
                wait=False)
        url = c.imds_url.replace("{instance_id}", instance.id)
        instance.watcher = RemoteWatcher.options(resources={key: 1 - WORKER_SHARE}).remote(
            url, c.imds_poll_s, c.rebalance == "drain")
        self._watching[instance.watcher.watch.remote()] = machine

    def _launch(self, markets: list[str]) -> list[Machine]:
        """Start machines; after start(), a replacement without capacity is asked for later."""
        machines = []
        for market in markets:
            try:
                machines += super()._launch([market])
            except AwsError as e:
                if not self._running:
                    raise
                self.machines_started -= 1  # counted by Pool._launch, never started
                delay = min(300.0, max(1.0, self.cloud.retry_backoff_s) * 2 ** self._failures)
                self._failures += 1
                log.warning("%s; asking again in %.0f s", e, delay)
                self._requests.append((time.monotonic() + delay, market))
            else:
                self._failures = 0
        return machines

    def _remove(self, machine: Machine) -> None:
        instance: Instance | None = machine.node
        if instance is None:
            return
        self._watching = {r: m for r, m in self._watching.items() if m.id != machine.id}
        with contextlib.suppress(RayError, ValueError):
            ray.kill(instance.watcher)
        if instance.node is not None:  # a stand-in node dies as the instance would
            if machine.worker_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(machine.worker_pid, signal.SIGKILL)
            self.cluster.remove_node(instance.node, allow_graceful=True)  # see simulated
            instance.node = None
        try:
            failed = self.ec2.terminate([instance.id])
        except AwsError as e:
            failed = {instance.id: str(e)}
        if failed:  # shutdown() tries again
            log.warning("cloud=aws: could not terminate %s: %s", instance.id, failed[instance.id])
        else:
            self.instances.pop(instance.id, None)

    def placement(self, machine: Machine) -> dict:
        return {"resources": {machine.node.key: WORKER_SHARE}}

    def _ready(self, machine: Machine) -> bool:
        """A replacement takes a worker once its instance's Ray node is in the cluster."""
        instance: Instance | None = machine.node
        if instance is None or instance.joined:
            return True
        if self._node_keys is None:
            self._node_keys = {key: node["Resources"].get("GPU", 0.0) for node in ray.nodes()
                               if node.get("Alive") for key in node.get("Resources", {})}
        instance.joined = instance.key in self._node_keys
        instance.gpus = self._node_keys.get(instance.key, 0.0)
        return instance.joined

    def machine_gpus(self, machine: Machine) -> float | None:
        """What the instance's Ray node declares (its type's GPUs, found by Ray on boot)."""
        instance: Instance | None = machine.node
        return instance.gpus if instance is not None and instance.joined else None

    def _drop_unjoined(self) -> None:
        """Terminate the replacements that did not join within cloud.join_timeout_s of their
        launch and ask for others, their (type, subnet) tried last from now on."""
        timeout = self.cloud.join_timeout_s
        now = time.monotonic()
        for machine in list(self._booting):
            if not timeout or now - machine.joined_at < timeout or self._ready(machine):
                continue
            instance: Instance = machine.node
            log.warning("machine %d: instance %s (%s, %s) did not join the Ray cluster within "
                        "cloud.join_timeout_s=%g; terminating it and asking for another",
                        machine.id, instance.id, instance.instance_type, instance.zone, timeout)
            self._avoid(instance)
            self._booting.remove(machine)
            self.reclaim([machine])

    def _avoid(self, instance: Instance) -> None:
        """The instance's (type, subnet) pool is left out of later fleet requests unless no
        other pool has capacity: a replacement failed to join there, or EC2 is taking
        capacity back there (a notice), so its replacement should land elsewhere."""
        self.avoid.update(c for c in self.choices if c[0] == instance.instance_type and
                          c[1] in (instance.subnet, None))

    def shutdown(self) -> None:
        """Terminate every instance of the job (those it launched and those the squall:job
        tag finds), verify they are going, then let go of Ray."""
        try:
            gone, left = self.ec2.terminate_job(self.job.run_name, sorted(self.instances),
                                                verify_s=min(5.0, self.cloud.api_backoff_s))
            if gone:
                log.info("terminated %d spot instance(s): %s", len(gone), " ".join(gone))
            if left:
                log.error("cloud=aws: could not terminate %s; run `squall cloud cleanup "
                          "run.name=%s` or terminate them in the EC2 console",
                          "; ".join(f"{i} ({why})" for i, why in sorted(left.items())),
                          self.job.run_name)
            self.instances = {i: v for i, v in self.instances.items() if i in left}
            self._delete_templates()
            if self.cloud.create_security_group:
                self._delete_groups()
        except AwsError as e:
            log.error("%s; instances of run.name=%s may still run: `squall cloud cleanup "
                      "run.name=%s`", e, self.job.run_name, self.job.run_name)
        finally:
            super().shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()

    def _create_group(self) -> None:
        """The job's own security group: its members, the head and SSH from cloud.ssh_cidr."""
        host = self.head.rpartition(":")[0].strip("[]")
        try:
            head_ip = socket.gethostbyname(host) if host else ""
        except OSError:
            raise ConfigError(f"cloud.head_address={self.head}: cannot resolve {host}") from None
        vpc = self.ec2.vpc(self.choices[0][1] if self.choices else None)
        self.groups.append(self.ec2.create_cluster_group(self.job.run_name, vpc, head_ip,
                                                         self.cloud.ssh_cidr))

    def _delete_templates(self) -> None:
        """The job's launch template goes with it (instant fleets need it no more)."""
        self._report_left("launch template(s)", self.ec2.delete_job_templates(self.job.run_name)[1])

    def _delete_groups(self) -> None:
        """The job's security group goes once its instances are gone (EC2 refuses while a
        terminating instance still uses it: tried again for a while)."""
        self._report_left("security group(s)", self.ec2.delete_job_groups(self.job.run_name)[1])

    def _report_left(self, what: str, left: dict[str, str]) -> None:
        """One error line for the job's resources that could not be deleted ({id: why})."""
        if left:
            log.error("cloud=aws: %s %s of run.name=%s left (%s); `squall cloud cleanup "
                      "run.name=%s` deletes them", what, " ".join(left), self.job.run_name,
                      "; ".join(sorted(set(left.values()))), self.job.run_name)

    # ---- notices
    def poll(self, step: int) -> PollResult:
        for machine in self._draining:  # their workers were drained after the last poll
            self._reclaim(machine)
        self._draining = []
        if time.monotonic() - self._prices_at > 3600:
            self._refresh_prices()
        self._node_keys = None
        self._drop_unjoined()
        result = super().poll(step)
        for machine, notice in self._notices():
            now = time.monotonic()
            machine.reclaim_at = now
            if notice["kind"] == "interruption":
                with contextlib.suppress(ValueError):  # a garbled time: reclaimed any moment
                    at = datetime.fromisoformat(notice["time"].replace("Z", "+00:00"))
                    machine.reclaim_at = now + max(0.0, at.timestamp() - time.time())
            log.warning("machine %d (%s): %s notice %s; draining its worker", machine.id,
                        machine.node.id, notice["kind"], notice["time"])
            result.noticed.append(machine)
            self._draining.append(machine)
            self._avoid(machine.node)  # the replacement goes to another pool if it can
            self._request(machine.market)  # the replacement is asked for at the notice
        return result

    def _notices(self) -> list[tuple[Machine, dict]]:
        """Notices the watchers returned since the last poll (never waits)."""
        if not self._watching:
            return []
        ready, _ = ray.wait(list(self._watching), num_returns=len(self._watching), timeout=0)
        found = []
        for ref in ready:
            machine = self._watching.pop(ref)
            try:
                notice = ray.get(ref)
            except RayError:  # the node is gone; the job notices its worker is lost
                continue
            if machine.id in self.alive and machine.reclaim_at is None:
                found.append((machine, notice))
        return found

    # ---- prices
    def _refresh_prices(self) -> None:
        start = datetime.now(timezone.utc) - timedelta(days=1)
        try:
            self.prices = SpotPrices(self.ec2.price_history(self.cloud.instance_types, start))
        except AwsError as e:  # costs fall back to cloud.spot_price
            log.warning("%s; pricing at cloud.spot_price", e)
        self._prices_at = time.monotonic()

    def price(self, machine: Machine, now: float) -> float:
        instance: Instance | None = machine.node
        if machine.market == "on_demand":
            return self.cloud.on_demand_price
        if instance is None:
            return self.cloud.spot_price
        at = time.time() - (time.monotonic() - now)
        found = self.prices.price(instance.instance_type, instance.zone, at)
        return self.cloud.spot_price if found is None else found

    def on_demand_price(self) -> float:
        return self.cloud.on_demand_price


# --------------------------------------------------------------------------- squall cloud
def cleanup(cloud: AwsCloudConfig, run_name: str) -> list[str]:
    """Terminate the instances tagged squall:job=<run_name> (what a crashed driver left
    running) and delete the job's launch template and security group; returns the
    instances' ids."""
    if not run_name:
        raise ConfigError("squall cloud cleanup needs run.name=NAME (the squall:job tag)")
    ec2 = Ec2(cloud)
    gone, left = ec2.terminate_job(run_name, verify_s=min(5.0, cloud.api_backoff_s))
    ec2.delete_job_templates(run_name)  # the job's launch template (a crashed driver's)
    ec2.delete_job_groups(run_name)  # the security group squall made for the job, if any
    if left:
        raise AwsError(f"cloud=aws: could not terminate {len(left)} instance(s) tagged "
                       f"{JOB_TAG}={run_name}: " + "; ".join(
                           f"{i} ({why})" for i, why in sorted(left.items()))
                       + (f" (terminated: {' '.join(gone)})" if gone else ""))
    return gone


def export_prices(cloud: AwsCloudConfig, out: str, hours: float, zone: str = "") -> str:
    """Write the spot price history of cloud.instance_types over the last `hours` to `out`
    (a trace for cloud=simulated); returns the line to print."""
    if not 0 < hours <= 90 * 24:
        raise ConfigError(f"hours={hours:g}: must be > 0 and <= 2160 (EC2 keeps 90 days)")
    ec2 = Ec2(cloud)
    start = datetime.now(timezone.utc) - timedelta(hours=hours)
    rows = ec2.price_history(cloud.instance_types, start, zone)
    if not rows:
        raise AwsError(f"cloud=aws: no spot prices for {', '.join(cloud.instance_types)} in "
                       f"{ec2.region} over the last {hours:g} h")
    write_trace(rows, out)
    return (f"squall: wrote {len(rows)} spot prices of {', '.join(cloud.instance_types)} in "
            f"{ec2.region} to {out} (use it as cloud.trace=FILE cloud.instance_type=TYPE)")
