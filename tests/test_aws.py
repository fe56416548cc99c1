"""cloud=aws against real servers on 127.0.0.1: the moto server answers EC2 (instant fleets,
launch templates, instances) and S3 over HTTP, a small proxy in front of it injects EC2's
per-pool capacity errors into CreateFleet replies, transient errors and lost replies, honours
ClientTokens, and serves a paginated spot price history (moto has no pages and one constant
price), and tests/imds_server.py plays the instance metadata service. End to end, local Ray
nodes stand in for the instances."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from imds_server import ImdsServer
from moto_server import fake_aws_env, moto_server

from cloud.aws import AwsError, AwsPool, Ec2, Instance, SpotPrices, user_data
from cloud.imds import ImdsClient, Watcher, check
from cloud.pool import Machine
from cloud.traces import load_trace
from orchestrator.checkpoint import CheckpointStore
from orchestrator.cli import main
from orchestrator.config import ConfigError, job_spec, load_config
from orchestrator.run import train

AMI = "ami-03cf127a"  # one of the images moto knows
TYPES = "cloud.instance_types=[g5.xlarge,g4dn.xlarge]"


# --------------------------------------------------------------------------- servers
OVERRIDE = re.compile(r"^LaunchTemplateConfigs\.1\.Overrides\.(\d+)\.(\w+)$")
NS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'


class Ec2Proxy:
    """Forwards EC2 calls to moto, except:
    - CreateFleet: a pool (instance type or subnet, "*", or the market "spot"/"on-demand")
      named in `fail` fails in the reply's Errors, as EC2 reports capacity per pool: the
      request goes to moto without the failing pools (moto launches in the first pool left)
      and the errors are added to its reply, or, when every pool fails, the reply has errors
      and no instance. Each rule holds for a number of fleet requests (-1: all).
    - `fail_call` (action -> (code, calls left)): the whole call fails with an EC2 error
      (InternalError, throttling, ...); `drop`: CreateFleet calls carried out by moto whose
      reply is lost (the connection closed without an answer).
    - Like EC2, a call with a ClientToken seen before returns the first answer again (moto
      has no idempotency for fleets or launch templates).
    - DescribeSpotPriceHistory is answered from `history` in pages of 3."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.fail: dict[str, tuple[str, int]] = {}  # pool key -> (code, fleet calls left)
        self.fail_call: dict[str, tuple[str, int]] = {}  # action -> (code, calls left)
        self.history: list[dict] = []
        self.calls: list[dict] = []  # the form of every EC2 call
        self.drop = 0  # CreateFleet calls whose reply is lost
        self.tokens: dict[tuple[str, str], tuple[int, bytes]] = {}  # first answers
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                proxy.calls.append(form)
                reply = proxy.answer(form)
                token = (form["Action"], form["ClientToken"]) if "ClientToken" in form else None
                if reply is None and token in proxy.tokens:
                    reply = proxy.tokens[token]
                if reply is None:  # pass it on to moto
                    form, errors = proxy.pool_errors(form)
                    if form is None:  # EC2's answer when no pool has capacity
                        reply = 200, (f"<CreateFleetResponse {NS}><requestId>r</requestId>"
                                      f"<fleetId>fleet-{uuid.uuid4()}</fleetId>{errors}"
                                      "<fleetInstanceSet/></CreateFleetResponse>").encode()
                    else:
                        reply = proxy.forward(urllib.parse.urlencode(form).encode(),
                                              self.headers)
                    if errors and form is not None and reply[0] == 200:
                        reply = reply[0], reply[1].replace(
                            b"</CreateFleetResponse>", errors.encode() + b"</CreateFleetResponse>")
                    if token and reply[0] == 200:
                        proxy.tokens[token] = reply
                    if token and token[0] == "CreateFleet" and proxy.drop:
                        proxy.drop -= 1
                        self.close_connection = True
                        return  # moto launched it; the reply never arrives
                status, data = reply
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def forward(self, body: bytes, headers) -> tuple[int, bytes]:
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
        upstream.request("POST", "/", body, headers)
        response = upstream.getresponse()
        return response.status, response.read()

    def _take(self, rules: dict[str, tuple[str, int]], key: str | None) -> str:
        """The code of the rule for key if it holds for one more call (and count it)."""
        code, left = rules.get(key, ("", 0)) if key else ("", 0)
        if left:
            rules[key] = (code, left - 1)
            return code
        return ""

    def answer(self, form: dict) -> tuple[int, bytes] | None:
        code = self._take(self.fail_call, form.get("Action"))
        if code:
            status = (500 if code == "InternalError" else 503 if code.endswith("Unavailable")
                      else 400)
            return status, (f"<Response><Errors><Error><Code>{code}</Code><Message>injected "
                            f"by the test</Message></Error></Errors><RequestID>r</RequestID>"
                            f"</Response>").encode()
        if form.get("Action") == "DescribeSpotPriceHistory" and self.history:
            start = int(form.get("NextToken", 0))
            page = self.history[start:start + 3]
            items = "".join(
                f"<item><instanceType>{r['InstanceType']}</instanceType><productDescription>"
                f"Linux/UNIX</productDescription><spotPrice>{r['SpotPrice']}</spotPrice>"
                f"<timestamp>{r['Timestamp']}</timestamp><availabilityZone>"
                f"{r['AvailabilityZone']}</availabilityZone></item>" for r in page)
            more = (f"<nextToken>{start + 3}</nextToken>"
                    if start + 3 < len(self.history) else "")
            return 200, (f"<DescribeSpotPriceHistoryResponse {NS}><requestId>r</requestId>"
                         f"<spotPriceHistorySet>{items}</spotPriceHistorySet>{more}"
                         f"</DescribeSpotPriceHistoryResponse>").encode()
        return None

    def pool_errors(self, form: dict) -> tuple[dict | None, str]:
        """A CreateFleet form without the pools that `fail` names (None: no pool left), and
        their errorSet XML ('': none failed)."""
        if form.get("Action") != "CreateFleet":
            return form, ""
        pools = fleet_pools(form)
        market = form.get("TargetCapacitySpecification.DefaultTargetCapacityType")
        keys = {k for pool in pools for k in (*pool, "*", market)}
        codes = {k: code for k in keys if (code := self.fail.get(k, ("", 0))[0])
                 and self.fail[k][1]}
        failed = {}
        for pool in pools:
            hit = [k for k in (*pool, "*", market) if k in codes]
            if hit:
                failed[pool] = codes[hit[0]]
        for k in codes:
            self._take(self.fail, k)
        if not failed:
            return form, ""
        template = (form["LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId"],
                    form["LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version"])
        errors = "<errorSet>" + "".join(
            f"<item><launchTemplateAndOverrides><launchTemplateSpecification><launchTemplateId>"
            f"{template[0]}</launchTemplateId><version>{template[1]}</version>"
            f"</launchTemplateSpecification><overrides><instanceType>{t}</instanceType>"
            + (f"<subnetId>{s}</subnetId>" if s else "")
            + f"</overrides></launchTemplateAndOverrides><lifecycle>{market}</lifecycle>"
            f"<errorCode>{code}</errorCode><errorMessage>injected by the test</errorMessage>"
            f"</item>" for (t, s), code in failed.items()) + "</errorSet>"
        left = [pool for pool in pools if pool not in failed]
        rest = {k: v for k, v in form.items() if not OVERRIDE.match(k)}
        for n, (t, s) in enumerate(left, 1):
            rest[f"LaunchTemplateConfigs.1.Overrides.{n}.InstanceType"] = t
            if s:
                rest[f"LaunchTemplateConfigs.1.Overrides.{n}.SubnetId"] = s
        return (rest if left else None), errors

    def fleets(self) -> list[dict]:
        """The CreateFleet requests as sent: market, strategy, pools, token, template."""
        return [{"market": c["TargetCapacitySpecification.DefaultTargetCapacityType"],
                 "capacity": c["TargetCapacitySpecification.TotalTargetCapacity"],
                 "type": c.get("Type"), "strategy": c.get("SpotOptions.AllocationStrategy",
                                                          c.get("OnDemandOptions.AllocationStrategy")),
                 "pools": fleet_pools(c), "token": c.get("ClientToken"),
                 "max_prices": [v for k, v in c.items() if k.endswith(".MaxPrice")],
                 "tags": {c[k]: c[k[:-3] + "Value"] for k in c
                          if re.match(r"^TagSpecification\.1\.Tag\.\d+\.Key$", k)
                          and c["TagSpecification.1.ResourceType"] == "instance"},
                 "template": (c["LaunchTemplateConfigs.1.LaunchTemplateSpecification."
                                "LaunchTemplateId"],
                              c["LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version"])}
                for c in self.calls if c.get("Action") == "CreateFleet"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fleet_pools(form: dict) -> list[tuple[str, str | None]]:
    """The (type, subnet) overrides of a CreateFleet form, in order."""
    found: dict[int, dict] = {}
    for key, value in form.items():
        if m := OVERRIDE.match(key):
            found.setdefault(int(m[1]), {})[m[2]] = value
    return [(o["InstanceType"], o.get("SubnetId")) for _, o in sorted(found.items())]


@pytest.fixture(scope="module")
def moto():
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(moto, monkeypatch):
    fake_aws_env(monkeypatch)
    return moto


@pytest.fixture
def proxy(aws):
    p = Ec2Proxy(aws)
    yield p
    p.close()


def cloud_config(endpoint: str, *more: str):
    return load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={endpoint}",
                        f"cloud.ami={AMI}", "cloud.retry_backoff_s=0", "cloud.api_backoff_s=0.01",
                        *more]).cloud


def _pool(cfg) -> AwsPool:
    return AwsPool(cfg.cloud, job_spec(cfg))


def ec2_client(endpoint: str):
    return boto3.client("ec2", endpoint_url=endpoint)


def instances(endpoint: str, job: str) -> dict[str, dict]:
    found = ec2_client(endpoint).describe_instances(
        Filters=[{"Name": "tag:squall:job", "Values": [job]}])
    return {i["InstanceId"]: i for r in found["Reservations"] for i in r["Instances"]}


def templates(endpoint: str, job: str) -> list[str]:
    """The ids of the launch templates tagged squall:job=<job>."""
    return [t["LaunchTemplateId"] for t in ec2_client(endpoint).describe_launch_templates(
        Filters=[{"Name": "tag:squall:job", "Values": [job]}])["LaunchTemplates"]]


def template_version(endpoint: str, template: str, version: str) -> dict:
    """The LaunchTemplateData of one version, as EC2 (moto) stored it."""
    [found] = ec2_client(endpoint).describe_launch_template_versions(
        LaunchTemplateId=template, Versions=[version])["LaunchTemplateVersions"]
    return found["LaunchTemplateData"]


def running(endpoint: str, job: str) -> list[str]:
    return sorted(i for i, d in instances(endpoint, job).items()
                  if d["State"]["Name"] in ("pending", "running"))


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides, message", [
    (["cloud.instance_types=[g5.xlarge]"], "cloud.instance_types needs cloud=aws"),
    (["cloud=simulated", "cloud.local_nodes=true"], "cloud.local_nodes needs cloud=aws"),
    (["cloud=aws", "cloud.preempt_prob=0.1"], "cloud.preempt_prob needs cloud=simulated"),
    (["cloud=aws", "cloud.instance_types=[]"], "cloud=aws needs cloud.instance_types"),
    (["cloud=aws", "cloud.imds_poll_s=0"], r"cloud.imds_poll_s=0.0: must be > 0"),
    (["cloud=aws", "cloud.imds_url=169.254.169.254"], "expected http://host"),
    (["cloud=aws", "cloud.rebalance=maybe"], "valid: drain, ignore"),
    (["cloud=aws", "cloud.launch_rounds=0"], "must be >= 1"),
    (["cloud=aws", "cloud.allocation=cheapest"], "cloud.allocation=cheapest: not allowed; valid: "
     "price-capacity-optimized, capacity-optimized, lowest-price"),
])
def test_aws_options_are_checked_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_an_unknown_allocation_strategy_is_one_line_and_exit_2(capsys):
    assert main(["config", "cloud=aws", "cloud.allocation=diversified"]) == 2
    err = capsys.readouterr().err
    assert err == ("squall: error: cloud.allocation=diversified: not allowed; valid: "
                   "price-capacity-optimized, capacity-optimized, lowest-price\n")


def test_the_pool_needs_an_image_a_run_name_and_a_region(aws, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="cloud=aws needs cloud.ami"):
        _pool(load_config(["cloud=aws"]))
    with pytest.raises(ConfigError, match="cloud=aws needs cloud.ami"):  # before the run dir
        train(load_config(["cloud=aws", "model=mlp", f"run.dir={tmp_path}", "run.name=x"]))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="cloud=aws needs run.name"):
        _pool(load_config(["cloud=aws", f"cloud.ami={AMI}"]))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(AwsError, match="no region; set cloud.region"):
        Ec2(load_config(["cloud=aws"]).cloud)


def test_token_auth_reads_the_token_with_the_instance_role(aws, tmp_path):
    """The user data joins with RAY_AUTH_MODE=token and a token it reads from SSM with the
    instance's role: run its auth lines in bash against moto; the token is not in the user
    data. Without an instance profile the option is a one-line error."""
    token = uuid.uuid4().hex
    boto3.client("ssm", endpoint_url=aws).put_parameter(
        Name="/squall/ray-token", Value=token, Type="SecureString")
    script = user_data(["source /opt/venv/bin/activate"], "10.0.0.5:6379", "squall_node_abc",
                       "/squall/ray-token", "us-east-1")
    lines = script.splitlines()
    assert token not in script and lines[lines.index("set -e") + 2] == "export RAY_AUTH_MODE=token"
    assert lines.index("export RAY_AUTH_TOKEN") < lines.index(next(
        line for line in lines if line.startswith("ray start")))
    auth = "\n".join(line for line in lines if "RAY_AUTH" in line)
    env = {**os.environ, "AWS_ENDPOINT_URL": aws,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", f"set -e\n{auth}\necho \"$RAY_AUTH_MODE $RAY_AUTH_TOKEN\""],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"token {token}"
    with pytest.raises(ConfigError, match="cloud.auth_token_parameter needs "
                       "cloud.instance_profile"):
        load_config(["cloud=aws", "cloud.auth_token_parameter=/squall/ray-token"])


# --------------------------------------------------------------------------- provisioning
def test_launch_is_one_instant_fleet_over_every_type_and_subnet_from_a_tagged_template(proxy):
    """One create_fleet (instant, one spot instance, price-capacity-optimized) with an
    override per (type, subnet), cloud.bid as each override's MaxPrice, a ClientToken, and a
    version of the job's launch template that carries the user data (IMDSv2 only, terminate
    on shutdown, the tags, a public IP by default); the instance moto launches from it is a
    tagged spot instance that runs that user data. moto's instant fleets apply the template's
    image, user data, tags and the override's type and subnet, not its metadata options,
    shutdown behaviour, network interfaces or instance profile: those are read back from the
    stored template."""
    cloud = cloud_config(proxy.url, "cloud.bid=0.7",
                         "cloud.setup=['source /opt/venv/bin/activate']")
    ec2 = Ec2(cloud)
    script = user_data(cloud.setup, "10.0.0.5:6379", "squall_node_abc")
    subnets = ec2.subnets([])
    choices = [(t, s) for t in cloud.instance_types for s, _ in subnets]
    assert len(subnets) >= 2 and len(choices) == 2 * len(subnets)
    info = ec2.launch({"squall:job": "prov", "squall:node": "squall_node_abc"}, script, choices,
                      cloud, rounds=1)
    [fleet] = proxy.fleets()
    assert fleet["type"] == "instant" and fleet["market"] == "spot" and fleet["capacity"] == "1"
    assert fleet["strategy"] == "price-capacity-optimized"
    assert fleet["pools"] == choices and fleet["max_prices"] == ["0.7"] * len(choices)
    assert fleet["token"].startswith("squall-")
    assert fleet["tags"] == {"squall:job": "prov", "squall:node": "squall_node_abc"}
    [template] = templates(proxy.url, "prov")
    assert fleet["template"] == (template, "1")
    data = template_version(proxy.url, template, "1")
    assert base64.b64decode(data["UserData"]).decode() == script
    assert data["ImageId"] == AMI and data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv1 off
    assert "NetworkInterfaces" not in data  # cloud.public_ip=true: the subnet's public IP
    # (moto also lists the template's own tag here)
    assert [t for t in data["TagSpecifications"] if t["ResourceType"] == "instance"] == [
        {"ResourceType": "instance", "Tags": [{"Key": "squall:job", "Value": "prov"},
                                              {"Key": "squall:node", "Value": "squall_node_abc"}]}]

    found = instances(proxy.url, "prov")[info["InstanceId"]]
    assert (info["InstanceType"], info["SubnetId"]) == choices[0]  # moto takes the first pool
    assert info["Placement"]["AvailabilityZone"] == subnets[0][1] == found["Placement"][
        "AvailabilityZone"]
    assert found["InstanceType"] == "g5.xlarge" and found["InstanceLifecycle"] == "spot"
    assert {t["Key"]: t["Value"] for t in found["Tags"]}["squall:node"] == "squall_node_abc"
    client = ec2_client(proxy.url)
    sent = base64.b64decode(client.describe_instance_attribute(
        InstanceId=info["InstanceId"], Attribute="userData")["UserData"]["Value"]).decode()
    assert sent == script
    lines = sent.splitlines()
    assert lines[0] == "#!/bin/bash" and "source /opt/venv/bin/activate" in lines
    # The node stays in the cluster until Ray ends there (the head is gone), then, or when a
    # setup line fails (set -e), the instance shuts down, which terminates it.
    assert lines.index("trap 'shutdown -h now' EXIT") < lines.index("set -e") < lines.index(
        "source /opt/venv/bin/activate")
    assert lines[-2:] == ["ray start --block --address=10.0.0.5:6379 "
                          "--resources='{\"squall_node_abc\": 1}'", "shutdown -h now"]

    # The next machine: a new version of the same template, with its own user data and tags.
    other = ec2.launch({"squall:job": "prov", "squall:node": "squall_node_def"}, "#!/bin/bash\n",
                       choices, cloud, rounds=1)
    assert proxy.fleets()[1]["template"] == (template, "2")
    assert {t["Key"]: t["Value"] for t in instances(proxy.url, "prov")[other["InstanceId"]][
        "Tags"]}["squall:node"] == "squall_node_def"
    cheap = cloud_config(proxy.url, "cloud.allocation=lowest-price")
    Ec2(cheap).launch({"squall:job": "prov"}, "", choices[:1], cheap, rounds=1)
    assert proxy.fleets()[2]["strategy"] == "lowest-price" and proxy.fleets()[2][
        "max_prices"] == []  # cloud.bid=0: up to the on-demand price
    Ec2(cloud).terminate_job("prov")
    made = templates(proxy.url, "prov")  # this one and the other Ec2's
    assert len(made) == 2 and template in made
    assert Ec2(cloud).delete_job_templates("prov") == (made, {})
    assert not templates(proxy.url, "prov")


def test_a_cluster_of_its_own_private_ips_and_an_instance_role(aws):
    """cloud.create_security_group: a group that admits only its members, the head and SSH
    from cloud.ssh_cidr; cloud.public_ip=false: a network interface without a public address;
    cloud.instance_profile: the instances' role. All three are in the launch template (moto's
    fleets do not apply them to the instance: read back from the template). The group is
    deleted with the job."""
    profile = f"squall-worker-{uuid.uuid4().hex[:6]}"
    boto3.client("iam", endpoint_url=aws).create_instance_profile(InstanceProfileName=profile)
    cloud = cloud_config(aws, "cloud.create_security_group=true",
                         "cloud.ssh_cidr=203.0.113.7/32", "cloud.public_ip=false",
                         f"cloud.instance_profile={profile}")
    ec2 = Ec2(cloud)
    (subnet, _), *_ = ec2.subnets([])
    group = ec2.create_cluster_group("sec", ec2.vpc(subnet), "10.0.0.5", cloud.ssh_cidr)
    rules = ec2_client(aws).describe_security_groups(GroupIds=[group])["SecurityGroups"][0][
        "IpPermissions"]
    admitted = sorted((r["IpProtocol"], r.get("FromPort"), tuple(
        [g["GroupId"] for g in r.get("UserIdGroupPairs", [])] +
        [c["CidrIp"] for c in r.get("IpRanges", [])])) for r in rules)
    assert admitted == sorted([("-1", None, (group, "10.0.0.5/32")),
                               ("tcp", 22, ("203.0.113.7/32",))]) or admitted == sorted([
        ("-1", None, (group,)), ("-1", None, ("10.0.0.5/32",)),
        ("tcp", 22, ("203.0.113.7/32",))])  # (one rule or two for the protocol "all")
    info = ec2.launch({"squall:job": "sec"}, "#!/bin/bash\n", [("g5.xlarge", subnet)], cloud,
                      rounds=1, groups=[group])
    assert info["InstanceId"] in instances(aws, "sec") and info["SubnetId"] == subnet
    [template] = templates(aws, "sec")
    data = template_version(aws, template, "1")
    assert data["NetworkInterfaces"] == [{"DeviceIndex": 0, "AssociatePublicIpAddress": False,
                                          "Groups": [group]}]  # no subnet: the override's
    assert "SecurityGroupIds" not in data and "SubnetId" not in data
    assert data["IamInstanceProfile"] == {"Name": profile}
    public = cloud_config(aws, f"cloud.instance_profile=arn:aws:iam::123456789012:"
                          f"instance-profile/{profile}")
    spec = Ec2(public).template_version({"squall:job": "sec"}, "", public, [group])
    data = template_version(aws, spec["LaunchTemplateId"], spec["Version"])
    assert data["SecurityGroupIds"] == [group] and "NetworkInterfaces" not in data
    assert data["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{profile}")
    ec2.terminate_job("sec")
    assert ec2.delete_job_groups("sec") == ([group], {})
    assert len(ec2.delete_job_templates("sec")[0]) == 2 and not templates(aws, "sec")


def test_a_pool_without_capacity_is_reported_in_errors_and_another_pool_launches(proxy,
                                                                                 caplog):
    proxy.fail["g5.xlarge"] = ("InsufficientInstanceCapacity", -1)
    cloud = cloud_config(proxy.url)
    choices = [("g5.xlarge", None), ("g4dn.xlarge", None)]
    caplog.set_level("INFO", logger="cloud.aws")
    info = Ec2(cloud).launch({"squall:job": "cap"}, "#!/bin/bash\n", choices, cloud, rounds=3)
    assert info["InstanceType"] == "g4dn.xlarge"
    assert [f["pools"] for f in proxy.fleets()] == [choices]  # one request, EC2 chose
    assert "no capacity in g5.xlarge in any subnet: InsufficientInstanceCapacity" in caplog.text


@pytest.mark.parametrize("code", ["SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
                                  "InsufficientInstanceCapacity", "UnfulfillableCapacity"])
def test_capacity_errors_are_retried_in_rounds_then_reported_once(proxy, code):
    cloud = cloud_config(proxy.url)
    choices = [("g5.xlarge", None), ("g4dn.xlarge", None)]
    proxy.fail["*"] = (code, 1)  # the first request finds no pool with capacity
    job = f"rounds-{code}"
    info = Ec2(cloud).launch({"squall:job": job}, "#!/bin/bash\n", choices, cloud, rounds=2)
    assert info["InstanceType"] == "g5.xlarge" and len(proxy.fleets()) == 2
    assert running(proxy.url, job) == [info["InstanceId"]]

    proxy.fail["*"] = (code, -1)
    with pytest.raises(AwsError) as e:
        Ec2(cloud).launch({"squall:job": job}, "#!/bin/bash\n", choices, cloud, rounds=2)
    assert str(e.value) == (
        f"cloud=aws: no spot capacity for g5.xlarge, g4dn.xlarge in 2 type/subnet choices after "
        f"cloud.launch_rounds=2 (last: g5.xlarge in any subnet: {code}; g4dn.xlarge in any "
        f"subnet: {code}); try more cloud.instance_types or cloud.subnets, a higher cloud.bid, "
        "or cloud.fallback=on_demand")
    assert len(proxy.fleets()) == 2 + 2
    assert running(proxy.url, job) == [info["InstanceId"]]


def test_other_launch_errors_fail_at_once(proxy):
    proxy.fail["*"] = ("InvalidAMIID.NotFound", -1)
    cloud = cloud_config(proxy.url)
    with pytest.raises(AwsError, match="create_fleet g5.xlarge in any subnet: "
                                       "InvalidAMIID.NotFound: injected by the test"):
        Ec2(cloud).launch({}, "", [("g5.xlarge", None), ("g4dn.xlarge", None)], cloud, 3)
    assert len(proxy.fleets()) == 1  # no second round
    proxy.fail_call["CreateFleet"] = ("UnauthorizedOperation", 1)  # the whole call
    with pytest.raises(AwsError, match="create_fleet: UnauthorizedOperation"):
        Ec2(cloud).launch({}, "", [("g5.xlarge", None)], cloud, 3)
    assert len(proxy.fleets()) == 2


@pytest.mark.parametrize("code", ["InternalError", "Unavailable", "RequestLimitExceeded"])
def test_a_transient_error_is_retried_with_the_same_client_token(proxy, code):
    proxy.fail_call["CreateFleet"] = (code, 1)  # EC2 answers the first request with an error
    proxy.fail_call["CreateLaunchTemplate"] = (code, 1)
    cloud = cloud_config(proxy.url)
    job = f"transient-{code}"
    info = Ec2(cloud).launch({"squall:job": job}, "#!/bin/bash\n",
                             [("g5.xlarge", None), ("g4dn.xlarge", None)], cloud, rounds=1)
    assert info["InstanceType"] == "g5.xlarge"
    for action in ("CreateFleet", "CreateLaunchTemplate"):
        calls = [c for c in proxy.calls if c.get("Action") == action]
        assert len(calls) == 2 and calls[0]["ClientToken"] == calls[1]["ClientToken"]
        assert calls[0]["ClientToken"].startswith("squall-")
    assert running(proxy.url, job) == [info["InstanceId"]] and len(templates(proxy.url, job)) == 1


def test_a_lost_reply_is_retried_and_starts_no_second_instance(proxy):
    proxy.drop = 1  # EC2 starts the instance, the answer never arrives
    cloud = cloud_config(proxy.url)
    info = Ec2(cloud).launch({"squall:job": "lost-reply"}, "", [("g5.xlarge", None)], cloud, 1)
    fleets = proxy.fleets()
    assert len(fleets) == 2 and fleets[0]["token"] == fleets[1]["token"]
    assert running(proxy.url, "lost-reply") == [info["InstanceId"]]  # one instance, not two
    other = Ec2(cloud).launch({"squall:job": "lost-reply"}, "", [("g5.xlarge", None)], cloud, 1)
    assert other["InstanceId"] != info["InstanceId"]  # another launch: another token


def test_transient_errors_that_persist_end_the_round_then_fail_in_one_line(proxy):
    proxy.fail_call["CreateFleet"] = ("InternalError", 3)  # one request and its 2 retries
    cloud = cloud_config(proxy.url, "cloud.api_retries=2")
    choices = [("g5.xlarge", None), ("g4dn.xlarge", None)]
    info = Ec2(cloud).launch({"squall:job": "persist"}, "", choices, cloud, rounds=2)
    assert info["InstanceType"] == "g5.xlarge"
    tokens = [f["token"] for f in proxy.fleets()]
    assert len(tokens) == 4 and len(set(tokens[:3])) == 1 and tokens[3] != tokens[0]
    proxy.fail_call["CreateFleet"] = ("Unavailable", -1)
    with pytest.raises(AwsError, match=r"last: create_fleet: Unavailable"):
        Ec2(cloud).launch({"squall:job": "persist"}, "", choices, cloud, rounds=1)


def test_avoided_pools_are_left_out_and_asked_for_only_when_no_other_has_room(proxy):
    """The pool of a noticed instance (or of a replacement that never joined) is not in the
    replacement's fleet request; only when no other pool has capacity does a second request
    ask for it alone."""
    cloud = cloud_config(proxy.url)
    a, b = [s for s, _ in Ec2(cloud).subnets([])[:2]]
    choices = [("g5.xlarge", a), ("g5.xlarge", b), ("g4dn.xlarge", a), ("g4dn.xlarge", b)]
    noticed = choices[0]
    info = Ec2(cloud).launch({"squall:job": "avoid"}, "", choices, cloud, 1, avoid={noticed})
    assert (info["InstanceType"], info["SubnetId"]) == choices[1]
    assert proxy.fleets()[-1]["pools"] == choices[1:]
    proxy.fail["g4dn.xlarge"] = ("InsufficientInstanceCapacity", -1)
    proxy.fail[b] = ("InsufficientInstanceCapacity", -1)
    info = Ec2(cloud).launch({"squall:job": "avoid"}, "", choices, cloud, 1, avoid={noticed})
    assert (info["InstanceType"], info["SubnetId"]) == noticed  # better than no machine
    assert [f["pools"] for f in proxy.fleets()[-2:]] == [choices[1:], [noticed]]


def test_shutdown_terminates_by_tag_despite_an_unknown_id_and_verifies(aws, caplog):
    """EC2 fails a whole terminate_instances call for one id it does not know (a stale id,
    or one it does not list yet right after launch): the others are terminated anyway, and
    an instance the driver never heard of (its launch reply lost) is found by its tag."""
    cfg = load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={aws}", f"cloud.ami={AMI}",
                       "run.name=stale", "cloud.api_backoff_s=0.01"])
    pool = _pool(cfg)
    ec2 = pool.ec2
    known = [ec2.launch({"squall:job": "stale"}, "", [("g5.xlarge", None)], cfg.cloud, 1)
             ["InstanceId"] for _ in range(2)]
    orphan = ec2.launch({"squall:job": "stale"}, "", [("g4dn.xlarge", None)], cfg.cloud, 1)
    bystander = ec2.launch({"squall:job": "not-this-one"}, "", [("g5.xlarge", None)],
                           cfg.cloud, 1)["InstanceId"]
    stale = "i-0123456789abcdef0"
    with pytest.raises(Exception, match="InvalidInstanceID.NotFound"):  # what EC2 does
        ec2_client(aws).terminate_instances(InstanceIds=[stale, *known])
    assert len(running(aws, "stale")) == 3
    for i in [stale, *known]:
        pool.instances[i] = Instance(i, "g5.xlarge", "us-east-1a", "k")
    caplog.set_level("INFO", logger="cloud.aws")
    pool.shutdown()
    assert running(aws, "stale") == [] and running(aws, "not-this-one") == [bystander]
    assert templates(aws, "stale") == [] and len(templates(aws, "not-this-one")) == 1
    states = {i: d["State"]["Name"] for i, d in instances(aws, "stale").items()}
    assert set(states) == {*known, orphan["InstanceId"]}
    assert set(states.values()) <= {"shutting-down", "terminated"}
    assert pool.instances == {}
    assert "terminated 3 spot instance(s)" in caplog.text
    assert f"EC2 does not know {stale}" in caplog.text and "could not" not in caplog.text


def test_an_instance_that_cannot_be_terminated_is_reported(aws, caplog, capsys):
    cloud = cloud_config(aws)
    ec2 = Ec2(cloud)
    ids = [ec2.launch({"squall:job": "stuck"}, "", [("g5.xlarge", None)], cloud, 1)
           ["InstanceId"] for _ in range(2)]
    ec2_client(aws).modify_instance_attribute(InstanceId=ids[0],
                                              DisableApiTermination={"Value": True})
    gone, left = ec2.terminate_job("stuck", [])
    assert gone == [ids[1]] and list(left) == [ids[0]]
    assert "OperationNotPermitted" in left[ids[0]]
    assert running(aws, "stuck") == [ids[0]]
    assert main(["cloud", "cleanup", "run.name=stuck", f"cloud.endpoint_url={aws}"]) == 2
    assert f"could not terminate 1 instance(s) tagged squall:job=stuck: {ids[0]}" in \
        capsys.readouterr().err
    ec2_client(aws).modify_instance_attribute(InstanceId=ids[0],
                                              DisableApiTermination={"Value": False})
    assert ec2.terminate_job("stuck") == ([ids[0]], {})


def test_a_replacement_that_never_joins_is_terminated_and_another_asked_for(aws, caplog):
    """No Ray node ever comes up for the instance (its setup failed, it cannot reach the
    head): after cloud.join_timeout_s it is terminated and another (type, subnet) is tried."""
    import ray

    cfg = load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={aws}", f"cloud.ami={AMI}",
                       "run.name=never-joins", "cloud.join_timeout_s=0.5",
                       "cloud.head_address=10.0.0.5:6379", "workers=1"])
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    pool = _pool(cfg)
    try:
        [first] = pool.start(1)
        pool._request("spot")
        assert pool.poll(1).joined == []  # launched, its node not in the cluster
        [waiting] = pool._booting
        late = waiting.node
        assert running(aws, "never-joins") == sorted([first.node.id, late.id])
        time.sleep(0.6)
        assert pool.poll(2).joined == []
        assert "did not join the Ray cluster within cloud.join_timeout_s=0.5" in caplog.text
        assert late.id not in pool.instances and waiting.id not in pool.alive
        [other] = pool._booting
        assert (other.node.instance_type, other.node.subnet) != (late.instance_type,
                                                                 late.subnet)
        assert instances(aws, "never-joins")[late.id]["State"]["Name"] == "terminated"
        assert running(aws, "never-joins") == sorted([first.node.id, other.node.id])
        assert pool.machines_started == 3
    finally:
        pool.shutdown()
        ray.shutdown()
    assert running(aws, "never-joins") == []


def test_setup_secrets_come_from_a_file_or_the_environment_and_are_never_stored(
        aws, tmp_path, monkeypatch):
    from orchestrator.config import to_dict, to_yaml
    from orchestrator.run import check_resumable

    (tmp_path / "setup.sh").write_text("export FILE_TOKEN=from-the-file\n")
    monkeypatch.setenv("SQUALL_SETUP", "export ENV_TOKEN=from-the-env")
    cfg = load_config(["cloud=aws", f"cloud.ami={AMI}", "run.name=setup",
                       "cloud.setup=['export INLINE_TOKEN=inline']",
                       f"cloud.setup_file={tmp_path / 'setup.sh'}"])
    pool = _pool(cfg)
    assert pool.setup == ["export INLINE_TOKEN=inline", "export FILE_TOKEN=from-the-file",
                          "export ENV_TOKEN=from-the-env"]
    assert cfg.cloud.setup == ["export INLINE_TOKEN=inline"]  # the config itself unchanged
    stored = to_yaml(cfg) + json.dumps(to_dict(cfg))
    assert "TOKEN" not in stored and "<redacted>" in stored
    assert to_dict(cfg)["cloud"]["setup"] == ["<redacted>"]
    assert to_dict(cfg)["cloud"]["setup_file"] == str(tmp_path / "setup.sh")  # a path only
    check_resumable(to_dict(cfg), cfg)  # a manifest stored so is resumed from
    assert to_dict(load_config(["cloud=aws"]))["cloud"]["setup"] == []
    with pytest.raises(ConfigError, match="cloud.setup_file=/nonexistent/x: cannot read it"):
        _pool(load_config(["cloud=aws", f"cloud.ami={AMI}", "run.name=setup",
                           "cloud.setup_file=/nonexistent/x"]))


def test_cleanup_terminates_what_a_crashed_run_left_by_its_tag(aws, capsys):
    cloud = cloud_config(aws)
    ec2 = Ec2(cloud)
    left = [ec2.launch({"squall:job": "crashed"}, "", [("g5.xlarge", None)], cloud, 1)
            ["InstanceId"] for _ in range(2)]
    other = ec2.launch({"squall:job": "other"}, "", [("g5.xlarge", None)], cloud, 1)
    assert running(aws, "crashed") == sorted(left) and len(templates(aws, "crashed")) == 1

    assert main(["cloud", "cleanup", "run.name=crashed", f"cloud.endpoint_url={aws}"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"squall: terminated 2 instance(s) tagged squall:job=crashed: {' '.join(sorted(left))}")
    assert running(aws, "crashed") == [] and running(aws, "other") == [other["InstanceId"]]
    assert templates(aws, "crashed") == [] and len(templates(aws, "other")) == 1
    assert main(["cloud", "cleanup", "run.name=crashed", f"cloud.endpoint_url={aws}"]) == 0
    assert "terminated 0 instance(s)" in capsys.readouterr().out
    assert main(["cloud", "cleanup", f"cloud.endpoint_url={aws}"]) == 2
    assert "needs run.name=NAME" in capsys.readouterr().err


def test_a_replacement_without_capacity_is_asked_for_again_later(proxy, caplog):
    """During training a launch makes one round and never sleeps in the training loop; the
    replacement is requested again after a backoff instead of stopping the job."""
    pool = _pool(load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={proxy.url}",
                              f"cloud.ami={AMI}", "run.name=later",
                              "cloud.retry_backoff_s=2"]))
    pool.choices, pool._running = [("g5.xlarge", None), ("g4dn.xlarge", None)], True
    proxy.fail["*"] = ("InsufficientInstanceCapacity", -1)
    pool._request("spot")
    result = pool.poll(1)
    assert result.joined == [] and pool.machines_started == 0 and pool.instances == {}
    assert [f["pools"] for f in proxy.fleets()] == [pool.choices]  # one request, one round
    [(ready_at, market)] = pool._requests
    assert market == "spot" and ready_at > time.monotonic() + 1
    assert "no spot capacity for g5.xlarge, g4dn.xlarge" in caplog.text
    assert "asking again in 2 s" in caplog.text


def test_without_spot_capacity_the_fallback_launches_on_demand(proxy, caplog):
    """cloud.fallback=on_demand: when no (type, subnet) has spot capacity (every pool in the
    spot fleet's Errors), the machine is launched by an on-demand fleet over the same pools,
    billed at the on-demand price; a later replacement tries spot first again. Without the
    option the launch fails with the one-line capacity error."""
    import ray

    args = ["cloud=aws", TYPES, f"cloud.endpoint_url={proxy.url}", f"cloud.ami={AMI}",
            "cloud.launch_rounds=1", "cloud.head_address=10.0.0.5:6379", "workers=1",
            "cloud.on_demand_price=3.5"]
    proxy.fail["spot"] = ("InsufficientInstanceCapacity", -1)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    pool = _pool(load_config([*args, "run.name=no-fallback"]))
    try:
        with pytest.raises(AwsError, match="no spot capacity for g5.xlarge, g4dn.xlarge"):
            pool.start(1)
    finally:
        pool.shutdown()
    assert running(proxy.url, "no-fallback") == []
    pool = _pool(load_config([*args, "run.name=fallback", "cloud.fallback=on_demand"]))
    try:
        [machine] = pool.start(1)
        assert machine.market == "on_demand" and pool.price(machine, time.monotonic()) == 3.5
        spot_fleet, on_demand = proxy.fleets()[-2:]
        assert spot_fleet["market"] == "spot" and on_demand["market"] == "on-demand"
        assert on_demand["strategy"] == "lowest-price" and on_demand["pools"] == pool.choices
        assert spot_fleet["pools"] == pool.choices and len(pool.choices) >= 4
        assert running(proxy.url, "fallback") == [machine.node.id]
        assert "InstanceLifecycle" not in instances(proxy.url, "fallback")[machine.node.id]
        assert "launching on demand (cloud.fallback=on_demand)" in caplog.text
        del proxy.fail["spot"]  # capacity is back: a replacement is spot again
        pool._running = True
        pool.reclaim([machine])
        [spot] = pool._launch(["on_demand"])
        assert spot.market == "spot" and pool.price(spot, time.monotonic()) != 3.5
        assert proxy.fleets()[-1]["market"] == "spot"
    finally:
        pool.shutdown()
        ray.shutdown()
    assert running(proxy.url, "fallback") == [] and templates(proxy.url, "fallback") == []


def test_a_noticed_pool_is_left_out_of_its_replacements_fleet_request(proxy):
    """A rebalance recommendation through IMDS for the instance: its replacement's fleet
    request leaves out that instance's (type, subnet) pool, so the replacement lands
    elsewhere (moto launches in the first pool of a request: without the exclusion it would
    land in the noticed pool again)."""
    pool = _pool(load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={proxy.url}",
                              f"cloud.ami={AMI}", "run.name=noticed", "workers=1",
                              "cloud.local_nodes=true", "cloud.imds_poll_s=0.1",
                              "cloud.replace_delay_s=0"]))
    with ImdsServer() as imds:
        pool.cloud.imds_url = f"{imds.url}/{{instance_id}}"
        try:
            [first] = pool.start(1)
            noticed = first.node
            assert (noticed.instance_type, noticed.subnet) == pool.choices[0]
            assert [f["pools"] for f in proxy.fleets()] == [pool.choices]
            imds.rebalance(noticed.id)
            deadline, step, seen = time.time() + 120, 0, []  # a guard against a hang
            while pool.machines_started < 2 and time.time() < deadline:
                step += 1
                seen += pool.poll(step).noticed
                time.sleep(0.1)
            assert [m.id for m in seen] == [first.id]
            [replacement] = set(pool.instances) - {noticed.id}
            replaced = pool.instances[replacement]
            assert pool.avoid == {pool.choices[0]}
            assert proxy.fleets()[-1]["pools"] == pool.choices[1:]  # the noticed pool left out
            assert (replaced.instance_type, replaced.subnet) == pool.choices[1]
        finally:
            pool.shutdown()
    assert running(proxy.url, "noticed") == [] and templates(proxy.url, "noticed") == []


# --------------------------------------------------------------------------- prices
def test_price_history_is_read_page_by_page_and_exported_as_a_trace(proxy, tmp_path, capsys):
    points = [("2026-03-01T00:00:00Z", "0.40"), ("2026-03-01T01:00:00Z", "0.45"),
              ("2026-03-01T02:00:00Z", "0.90"), ("2026-03-01T03:00:00Z", "0.38"),
              ("2026-03-01T04:00:00Z", "0.41"), ("2026-03-01T05:00:00Z", "0.39"),
              ("2026-03-01T06:00:00Z", "0.42")]
    proxy.history = [{"Timestamp": t, "AvailabilityZone": "us-east-1a",
                      "InstanceType": "g5.xlarge", "SpotPrice": p} for t, p in reversed(points)]
    out = tmp_path / "g5.csv"
    assert main(["cloud", "prices", f"out={out}", "hours=24", "cloud.instance_types=[g5.xlarge]",
                 f"cloud.endpoint_url={proxy.url}"]) == 0
    assert "wrote 7 spot prices of g5.xlarge" in capsys.readouterr().out
    pages = [c for c in proxy.calls if c["Action"] == "DescribeSpotPriceHistory"]
    assert [c.get("NextToken") for c in pages] == [None, "3", "6"]
    trace = load_trace(str(out), "g5.xlarge")
    assert trace.prices == [float(p) for _, p in points]
    assert trace.times == [3600.0 * i for i in range(7)]

    since = datetime(2026, 3, 1, tzinfo=timezone.utc)
    prices = SpotPrices(Ec2(cloud_config(proxy.url)).price_history(["g5.xlarge"], since))
    t0 = 1772323200.0  # 2026-03-01T00:00:00Z
    assert prices.price("g5.xlarge", "us-east-1a", t0 + 2 * 3600 + 5) == 0.90
    assert prices.price("g5.xlarge", "us-east-1b", t0 + 10 * 3600) == 0.42  # another zone
    assert prices.price("g5.xlarge", "us-east-1a", t0 - 60) == 0.40
    assert prices.price("p4d.24xlarge", "us-east-1a", t0) is None

    assert main(["cloud", "prices", f"out={out}", "hours=abc"]) == 2
    assert "hours=abc: expected a number of hours" in capsys.readouterr().err


def test_machines_are_priced_from_the_spot_price_history_of_their_type_and_zone(proxy):
    proxy.history = [
        {"Timestamp": "2026-03-01T00:00:00Z", "AvailabilityZone": "us-east-1a",
         "InstanceType": "g5.xlarge", "SpotPrice": "0.45"},
        {"Timestamp": "2026-03-01T00:00:00Z", "AvailabilityZone": "us-east-1b",
         "InstanceType": "g5.xlarge", "SpotPrice": "0.31"},
        {"Timestamp": "2026-03-01T00:00:00Z", "AvailabilityZone": "us-east-1a",
         "InstanceType": "g4dn.xlarge", "SpotPrice": "0.22"}]
    pool = _pool(load_config(["cloud=aws", TYPES, f"cloud.endpoint_url={proxy.url}",
                              f"cloud.ami={AMI}", "run.name=priced"]))
    pool._refresh_prices()
    now = time.monotonic()
    priced = [pool.price(Machine(0, "spot", now, Instance("i-1", t, z, "k")), now)
              for t, z in [("g5.xlarge", "us-east-1a"), ("g5.xlarge", "us-east-1b"),
                           ("g4dn.xlarge", "us-east-1c")]]
    assert priced == [0.45, 0.31, 0.22]


def test_prices_from_moto_load_as_a_trace(aws, tmp_path):
    out = tmp_path / "moto.csv"
    assert main(["cloud", "prices", f"out={out}", "zone=us-east-1a", TYPES,
                 f"cloud.endpoint_url={aws}"]) == 0
    assert load_trace(str(out), "g4dn.xlarge").prices == [0.00001]


# --------------------------------------------------------------------------- IMDSv2 watcher
def test_watcher_reads_notices_with_imdsv2_tokens_only():
    with ImdsServer() as imds:
        url = f"{imds.url}/i-0123"
        client = ImdsClient(url)
        assert check(client) is None
        imds.rebalance("i-0123")
        notice = check(client)
        assert notice["kind"] == "rebalance" and notice["time"].endswith("Z")
        assert check(client, rebalance=False) is None
        imds.interrupt("i-0123", action="stop", in_s=120)
        imds.revoke_tokens()  # as when the token's TTL runs out: get another one, carry on
        notice = check(client)
        assert notice["kind"] == "interruption" and notice["action"] == "stop"
        gets = imds.gets("i-0123")
        assert [valid for _, _, valid in gets].count(False) == 1  # the revoked token, once
        assert [r[0] for r in imds.requests].count("PUT") == 2
        assert Watcher(url, poll_s=0.01).watch()["kind"] == "interruption"

        with pytest.raises(urllib.error.HTTPError) as e:  # IMDSv1 (no token): refused
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"{url}/latest/meta-data/spot/instance-action", timeout=5)
        assert e.value.code == 401


def test_watcher_keeps_polling_until_a_notice_arrives():
    with ImdsServer() as imds:
        url = f"{imds.url}/i-0456"
        threading.Timer(0.3, imds.interrupt, ("i-0456",)).start()
        assert Watcher(url, poll_s=0.05, rebalance=False).watch()["action"] == "terminate"
        assert len(imds.gets("i-0456")) >= 2 and all(v for _, _, v in imds.gets("i-0456"))


# --------------------------------------------------------------------------- end to end
def test_job_on_spot_instances_drains_a_noticed_worker_replaces_it_and_cleans_up(aws,
                                                                                 tmp_path):
    """squall train cloud=aws with local Ray nodes standing in for the instances: a spot
    interruption notice through IMDS drains that worker and a replacement instance joins; then
    Ctrl-C ends the run: it checkpoints to S3, writes its summary and terminates everything.
    The run's files, its checkpoints and its output never contain the AWS secret."""
    moto, job = aws, "spot-e2e"
    secret = f"squall-test-secret-{uuid.uuid4().hex}"
    # Secrets in the instances' setup: inline (stored redacted), a file, the environment.
    setup = {where: f"squall-setup-{where}-{uuid.uuid4().hex}" for where in
             ("inline", "file", "env")}
    setup_file = tmp_path.parent / f"{job}-setup.sh"  # outside the run's directory
    setup_file.write_text(f"export FILE_TOKEN={setup['file']}\n")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "SQUALL_S3_ENDPOINT_URL": moto,
           "SQUALL_SETUP": f"export ENV_TOKEN={setup['env']}"}
    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket="spot-ckpts")
    metrics = tmp_path / job / "metrics.jsonl"

    def live() -> list[int]:
        text = metrics.read_text() if metrics.exists() else ""
        return [json.loads(line)["live_workers"] for line in text.splitlines() if line]

    with ImdsServer() as imds:
        args = [sys.executable, "-m", "orchestrator", "train", "cloud=aws", TYPES,
                "cloud.local_nodes=true", f"cloud.endpoint_url={moto}", f"cloud.ami={AMI}",
                f"cloud.imds_url={imds.url}/{{instance_id}}", "cloud.imds_poll_s=0.2",
                "workers=2", "steps=1000000", "model=mlp", "log.progress=false", "eval.every=0",
                f"run.dir={tmp_path}", f"run.name={job}", f"checkpoint.dir=s3://spot-ckpts/{job}",
                f"cloud.setup=['export INLINE_TOKEN={setup['inline']}']",
                f"cloud.setup_file={setup_file}", "cloud.create_security_group=true"]
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            proc = subprocess.Popen(args, stdout=out, stderr=err, env=env,
                                    start_new_session=True)  # its Ray nodes: one group
        try:
            deadline = time.time() + 420  # a guard against a hang, not a speed test
            first: list[str] = []
            while proc.poll() is None and time.time() < deadline and not (first and live()):
                first = running(moto, job)
                time.sleep(0.2)
            assert len(first) == 2, (tmp_path / "err").read_text()[-3000:]
            # their launch template gives them a security group of the job's own (moto's
            # fleets do not apply a template's groups to the instance: read the template)
            [template] = templates(moto, job)
            versions = ec2_client(moto).describe_launch_template_versions(
                LaunchTemplateId=template)["LaunchTemplateVersions"]
            groups = {g for v in versions for g in v["LaunchTemplateData"]["SecurityGroupIds"]}
            assert len(versions) == 2 and len(groups) == 1, versions
            [name] = [g["GroupName"] for g in ec2_client(moto).describe_security_groups(
                GroupIds=list(groups))["SecurityGroups"]]
            assert name.startswith(f"squall-{job}-")
            imds.interrupt(first[0], in_s=120)  # EC2 schedules the reclaim of one instance
            back = False  # one worker drained, then two again: the replacement took part
            while proc.poll() is None and time.time() < deadline and not back:
                seen = live()
                back = 1 in seen and seen[-1] == 2 and seen.index(1) < len(seen) - 1
                time.sleep(0.2)
            assert back, (tmp_path / "err").read_text()[-3000:]
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=120) == 130, (tmp_path / "err").read_text()[-3000:]
        finally:
            if proc.poll() is None:  # a failed test leaves no driver or Ray node behind
                os.killpg(proc.pid, signal.SIGKILL)
        assert all(valid for _, _, valid in imds.gets())  # every IMDS read carried a token

    summary = json.loads((tmp_path / job / "summary.json").read_text())
    assert summary["interrupted"] and summary["preemptions"] == 1 and summary["joins"] == 1
    assert 0 < summary["cost_usd"] < summary["on_demand_cost_usd"]
    started = instances(moto, job)
    assert len(started) == 3 and running(moto, job) == []  # 2 + 1 replacement, all gone
    assert started[first[0]]["State"]["Name"] == "terminated"
    [replacement] = set(started) - set(first)  # launched in another (type, subnet) pool:
    # moto's fleet takes the first pool of a request, so both first ones share a pool, and
    # the replacement's request left the noticed one out

    def pool(i: dict) -> tuple[str, str]:
        return i["InstanceType"], i["SubnetId"]

    assert pool(started[replacement]) != pool(started[first[0]])
    # the job's launch template and security group are deleted with it
    assert templates(moto, job) == []
    assert not ec2_client(moto).describe_security_groups(Filters=[
        {"Name": "tag:squall:job", "Values": [job]}])["SecurityGroups"]
    assert "interruption notice" in (tmp_path / "err").read_text()
    store = CheckpointStore(f"s3://spot-ckpts/{job}", endpoint_url=moto)
    assert store.load_latest().step == summary["steps_done"]  # the Ctrl-C checkpoint

    # The setup lines went to the instances (their user data), in order.
    sent = base64.b64decode(ec2_client(moto).describe_instance_attribute(
        InstanceId=first[0], Attribute="userData")["UserData"]["Value"]).decode().splitlines()
    assert [line.split("=")[1] for line in sent if "_TOKEN=" in line] == [
        setup["inline"], setup["file"], setup["env"]]
    # No secret anywhere: run directory (config.yaml, summary.json, ...), output, checkpoints
    # (their manifests hold the config) in S3.
    secrets = [secret.encode(), *(s.encode() for s in setup.values())]
    s3 = boto3.client("s3", endpoint_url=moto)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="spot-ckpts")["Contents"]]
    assert keys and all(key.startswith(f"{job}/ckpt-") or key == f"{job}/WRITER"
                        for key in keys)
    for key in keys:
        data = s3.get_object(Bucket="spot-ckpts", Key=key)["Body"].read()
        assert not [s for s in secrets if s in data], key
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) >= 5  # out, err, config.yaml, metrics.jsonl, summary.json, model.pt
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s in data], path
    assert "<redacted>" in (tmp_path / job / "config.yaml").read_text()


def test_the_cluster_launcher_file_passes_rays_schema_with_spot_workers():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(__file__).parent.parent / "conf" / "cluster" / "aws-spot.yaml"
    cluster = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cluster)  # raises on anything `ray up` would refuse
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on demand
    spot = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert spot and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
                        for t in spot)
    # squall installed, Ray and torch pinned, more file descriptors, no public dashboard
    setup = " ".join(cluster["setup_commands"])
    assert '"ray[default]==' in setup and '"torch==' in setup and '"torchvision==' in setup
    assert "-e ~/squall" in setup
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("ulimit -n 65536" in c for c in starts if "ray start" in c)
    assert "0.0.0.0" not in path.read_text()
