"""The cloud layer's configuration: one dataclass per pool, the Ray connection, and the few
facts of the job a pool needs (JobSpec). Plain Python (no Ray, nothing from orchestrator/):
`cloud=<name>` picks the class in CLOUDS, so `cloud.preempt_prob` exists only with
cloud=simulated and `cloud.ami` only with cloud=aws.

Add a pool: a subclass of CloudConfig beside its code, one entry in CLOUDS, one branch in
`cloud.make_pool`.
"""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, field
from types import MappingProxyType

from conf.schema import ConfigError, opt


def secret(f: Field) -> Field:
    """Mark a field (from opt()) as secret: config.yaml and checkpoint manifests show it
    redacted (orchestrator.config.to_yaml / to_dict)."""
    f.metadata = MappingProxyType({**f.metadata, "secret": True})
    return f


@dataclass
class RayConfig:
    address: str | None = opt(None, "Ray cluster to join (default: $RAY_ADDRESS, else start one)")
    num_cpus: int | None = opt(None, "CPUs of a locally started Ray (default: enough for workers)",
                               ge=1)
    dashboard: bool = opt(False, "start the Ray dashboard with a local cluster")
    working_dir: str = opt("", "directory uploaded to every node for the workers (Ray's "
                           "runtime_env working_dir): where your model/data modules live")
    py_modules: list[str] = opt([], "local packages or module directories uploaded to every "
                                "node (Ray's runtime_env py_modules)")

    def runtime_env(self) -> dict | None:
        """The runtime_env for ray.init: the user's code on every node (None: nothing)."""
        env: dict = {}
        if self.working_dir:
            env["working_dir"] = self.working_dir
        if self.py_modules:
            env["py_modules"] = list(self.py_modules)
        return env or None


@dataclass(frozen=True)
class JobSpec:
    """What a pool needs to know about the job beyond its cloud slice."""

    workers: int  # machines to keep, one worker each
    seed: int = 0  # preemption draws (cloud=simulated)
    run_name: str = ""  # the squall:job tag of the instances (cloud=aws)
    worker_num_cpus: float = 1.0  # CPUs of each machine's worker
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class CloudConfig:
    """cloud=local (this machine, or the cluster in ray.address) and cloud=static (a cluster you
    already run): machines that never vanish on their own. The base of every pool's config."""

    name: str = opt("local", "where workers run; pick it with cloud=<name>")
    spot_price: float = opt(0.1, "spot price in $/h when there is no trace", ge=0)
    on_demand_price: float = opt(0.4, "on-demand price in $/h", ge=0)
    replace_delay_s: float = opt(2.0, "seconds until a replacement machine joins", ge=0)
    max_nodes: int = opt(0, "most machines the pool may start in a run (0: no cap)", ge=0)

    def check(self, workers: int) -> None:
        """Rules across fields (and the worker count); ConfigError on one line."""
        if self.max_nodes and self.max_nodes < workers:
            raise ConfigError(f"cloud.max_nodes={self.max_nodes}: must be >= workers={workers} "
                              "(or 0 for no cap)")


@dataclass
class SimulatedCloudConfig(CloudConfig):
    """cloud=simulated: a spot pool of local Ray nodes (cloud/simulated.py)."""

    preempt_prob: float = opt(0.0, "chance each spot worker is reclaimed in a step (simulated)",
                              ge=0, lt=1)
    reclaims_per_hour: float = opt(0.0, "wall-clock preemption: each spot worker is reclaimed "
                                   "at this rate per hour of pool time (wall time x "
                                   "cloud.time_scale), a Poisson process (simulated)", ge=0)
    trace: str = opt("", "spot price history CSV (EC2 layout); workers live while price <= bid")
    bid: float = opt(0.0, "bid in $/h against cloud.trace (0: the on-demand price)", ge=0)
    time_scale: float = opt(1.0, "pool (trace) seconds per wall-clock second", gt=0)
    instance_type: str = opt("", "trace rows to use (default: the first type in the file)")
    notice_s: float = opt(0.0, "warning before each reclaim, in seconds (0: none)", ge=0)
    on_demand_workers: int = opt(0, "workers placed on on-demand machines, never reclaimed",
                                 ge=0)
    warm_nodes: int = opt(0, "Ray nodes kept started ahead of requests, each with a standby "
                          "worker (imports done, training split loaded), billed at the spot "
                          "price: a replacement takes one instead of booting its node and "
                          "worker (0: each replacement boots its own)", ge=0)
    node_gpus: int = opt(0, "GPUs each simulated node declares to Ray (resources only: to "
                         "try GPU placement on a machine without GPUs)", ge=0)
    replace_delay_steps: int | None = opt(
        -1, "steps a reclaimed worker's slot stays empty: its replacement takes part from step "
        "reclaim + d + 1, as the planner's model says; it starts at once and waits for that "
        "step; a slower one holds the step clock (cloud.join_wait_s). Wins over "
        "cloud.replace_delay_s; -1 or null: off (replacements after cloud.replace_delay_s)",
        ge=-1)
    join_wait_s: float = opt(
        120.0, "with cloud.replace_delay_steps: the most seconds the step clock waits before "
        "a step for the replacements due by it (boots longer than d steps), so that a slot is "
        "empty for exactly d steps; those still missing then join late, unwaited for; the "
        "waits add wall time, reported as the summary's clock_held_s (0: no waiting)", ge=0)

    def check(self, workers: int) -> None:
        models = [k for k in ("preempt_prob", "reclaims_per_hour", "trace") if getattr(self, k)]
        if len(models) > 1:
            raise ConfigError(f"cloud.{models[0]} and cloud.{models[1]} are two preemption "
                              "models; set one of them")
        if self.replace_delay_steps is not None and self.replace_delay_steps >= 0 and (
                self.trace or self.reclaims_per_hour):
            clock = "cloud.trace" if self.trace else "cloud.reclaims_per_hour"
            raise ConfigError("cloud.replace_delay_steps counts steps after a per-step reclaim "
                              f"(cloud.preempt_prob); with {clock} use cloud.replace_delay_s "
                              "(wall clock)")
        if self.on_demand_workers > workers:
            raise ConfigError(f"cloud.on_demand_workers={self.on_demand_workers}: must be <= "
                              f"workers={workers}")
        super().check(workers)


@dataclass
class AwsCloudConfig(CloudConfig):
    """cloud=aws: EC2 spot instances that join the driver's Ray cluster (cloud/aws.py)."""

    bid: float = opt(0.0, "EC2's spot MaxPrice in $/h (0: the on-demand price)", ge=0)
    instance_types: list[str] = opt([], "EC2 instance types the fleet may launch, each in "
                                    "every subnet (aws)")
    allocation: str = opt("price-capacity-optimized", "EC2 Fleet's spot allocation strategy "
                          "over the (type, subnet) pools: price-capacity-optimized (the pools "
                          "least likely to be interrupted, then the cheapest of those), "
                          "capacity-optimized (the deepest pools whatever the price) or "
                          "lowest-price (the cheapest pool first) (aws)",
                          choices=["price-capacity-optimized", "capacity-optimized",
                                   "lowest-price"])
    region: str = opt("", "EC2 region (aws; default: boto3's, e.g. $AWS_DEFAULT_REGION)")
    subnets: list[str] = opt([], "subnet ids to launch in, one per AZ (aws; default: the "
                             "default VPC's)")
    security_groups: list[str] = opt([], "security group ids of the instances (aws; default: "
                                     "the VPC's default group)")
    create_security_group: bool = opt(False, "give the instances a security group of their "
                                      "own that admits only each other, the Ray head and SSH "
                                      "from cloud.ssh_cidr; deleted at the end (aws)")
    ssh_cidr: str = opt("", "CIDR allowed to SSH into the instances through that group, e.g. "
                        "your IP as 203.0.113.7/32 (aws; default: nobody)")
    public_ip: bool = opt(True, "give the instances public IP addresses (aws; false: private "
                          "only, for subnets with a NAT or VPC endpoints)")
    instance_profile: str = opt("", "IAM instance profile (name or ARN) of the instances: their "
                                "own role, e.g. to read cloud.auth_token_parameter (aws)")
    auth_token_parameter: str = opt("", "SSM parameter (SecureString) holding the Ray cluster's "
                                    "token: instances read it with their role and join with "
                                    "RAY_AUTH_MODE=token (aws)")
    ami: str = opt("", "image with Python, Ray and squall installed (aws)")
    setup: list[str] = secret(opt([], "shell lines the instances run before `ray start` (aws; "
                                  "stored redacted; secrets: cloud.setup_file or $SQUALL_SETUP)"))
    setup_file: str = opt("", "file of shell lines run after cloud.setup, read at launch and "
                          "never stored (aws); $SQUALL_SETUP lines follow it")
    head_address: str = opt("", "Ray head the instances join (aws; default: the GCS address "
                            "of the driver's Ray)")
    endpoint_url: str = opt("", "EC2 API endpoint (aws; default: AWS's; tests point it at moto)")
    imds_url: str = opt("http://169.254.169.254", "instance metadata service the watchers poll; "
                        "{instance_id} is filled in (aws)")
    imds_poll_s: float = opt(5.0, "seconds between a watcher's looks at the metadata service "
                             "(aws)", gt=0, le=60)
    rebalance: str = opt("drain", "on a rebalance recommendation: drain the worker and replace "
                         "the instance, or ignore it (aws)", choices=["drain", "ignore"])
    fallback: str = opt("none", "when no spot capacity is found: none (report it; a "
                        "replacement is asked for again later) or on_demand (launch that "
                        "machine on demand, billed at cloud.on_demand_price) (aws)",
                        choices=["none", "on_demand"])
    launch_rounds: int = opt(3, "fleet requests over all types and subnets before a launch "
                             "fails (aws)",
                             ge=1, le=20)
    retry_backoff_s: float = opt(5.0, "wait after a failed round, doubling each round (aws)",
                                 ge=0, le=600)
    api_retries: int = opt(3, "retries of a launch after a transient EC2 error (InternalError, "
                           "throttling, timeouts), with the same ClientToken (aws)", ge=0, le=10)
    api_backoff_s: float = opt(1.0, "wait before the first such retry, doubling (aws)", ge=0,
                               le=60)
    join_timeout_s: float = opt(600.0, "a replacement instance not in the Ray cluster this long "
                                "after its launch is terminated and another one asked for "
                                "(aws; 0: wait forever)", ge=0)
    local_nodes: bool = opt(False, "tests: a local Ray node stands in for each instance (aws)")

    def check(self, workers: int) -> None:
        if not self.instance_types:
            raise ConfigError("cloud=aws needs cloud.instance_types, e.g. "
                              "[g5.xlarge,g4dn.xlarge]")
        if self.auth_token_parameter and not self.instance_profile:
            raise ConfigError("cloud.auth_token_parameter needs cloud.instance_profile: the "
                              "instances read the token with their own role")
        if self.ssh_cidr and not self.create_security_group:
            raise ConfigError("cloud.ssh_cidr needs cloud.create_security_group=true")
        if not re.match(r"^https?://[^/]", self.imds_url):
            raise ConfigError(f"cloud.imds_url={self.imds_url}: expected http://host[:port]")
        super().check(workers)


# cloud=<option> -> the schema of its cloud.* keys (the pools: cloud.make_pool).
CLOUDS: dict[str, type[CloudConfig]] = {
    "local": CloudConfig,
    "simulated": SimulatedCloudConfig,
    "static": CloudConfig,
    "aws": AwsCloudConfig,
}


def cloud_config_class(name: str) -> type[CloudConfig]:
    """The config class of cloud=<name>; ConfigError listing the valid names."""
    try:
        return CLOUDS[name]
    except KeyError:
        raise ConfigError(f"cloud={name}: unknown option; valid: "
                          f"{', '.join(sorted(CLOUDS))}") from None
