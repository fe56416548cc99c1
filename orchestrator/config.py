"""Configuration: structured dataclasses, YAML groups in conf/, and command-line overrides.

The grammar follows Hydra's basic override syntax:
  group=option   pick a YAML file from conf/<group>/ (e.g. strategy=krum)
  a.b=value      set one field (value parsed as YAML: 3, 0.1, true, null, [a, b])
Every field carries a one-line help text and its allowed range; `squall train --help` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("strategy", "data", "model", "cloud")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line meant for the terminal."""


def opt(default: Any, help: str, *, choices: list[str] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- schema
@dataclass
class StrategyConfig:
    name: str = opt("mean", "aggregation rule; pick it with strategy=<name>")
    f: int | None = opt(None, "Byzantine workers the rule must tolerate (default: byzantine.f)",
                        ge=0)
    m: int = opt(0, "multi_krum: average the m best-scored gradients (0: n - f)", ge=0)
    pre: list[str] = opt([], "pre-aggregation steps before the rule, e.g. [nnm] or [bucketing]")
    bucket_size: int = opt(2, "bucketing: gradients averaged per bucket", ge=1)
    tau: float = opt(1.0, "centered_clip: clipping radius", gt=0)
    iters: int = opt(3, "centered_clip: clipping iterations per step", ge=1)
    tol: float = opt(1e-6, "geomed: relative tolerance of the Weiszfeld iterations", gt=0)
    noise: float = opt(0.0, "median/sign_vote: workers add noise*N(0,I) first (Chen et al.)",
                       ge=0)
    on_too_few: str = opt("skip", "when too few live workers remain for the rule's guarantee",
                          choices=["skip", "fail"])
    topology: str = opt("ring", "gossip: who talks to whom",
                        choices=["ring", "torus", "exponential", "one_peer_exp", "complete"])
    compress: str = opt("none", "gossip: message format (none = fp32 D-PSGD)",
                        choices=["none", "moniqua", "choco"])
    bits: int = opt(2, "gossip moniqua: bits per parameter (1, 2, 4 or 8)")
    rounding: str = opt("dither", "gossip moniqua: quantizer rounding (dither: shared "
                        "subtractive dither; stochastic needs >= 2 bits)",
                        choices=["dither", "stochastic", "nearest"])
    block_size: int = opt(128, "gossip moniqua: values per block with its own theta (0: one "
                          "for the whole model)", ge=0)
    gamma: float | None = opt(None, "gossip: consensus step size of moniqua and choco "
                              "(default: moniqua 0.1 at 1 bit, 0.3 at 2, 1 at 4 and 8; "
                              "choco 0.3)", gt=0, le=1)
    theta_margin: float = opt(1.2, "gossip moniqua: theta = margin x measured neighbour spread",
                              ge=1)
    choco_compressor: str = opt("sign", "gossip choco: compressor", choices=["sign", "qsgd"])
    consensus_every: int = opt(1, "gossip: measure consensus_dist every N steps", ge=1)


@dataclass
class ByzantineConfig:
    f: int = opt(0, "simulated Byzantine workers (which ones is fixed by seed)", ge=0)
    attack: str = opt("sign_flip", "what the Byzantine workers send",
                      choices=["sign_flip", "gaussian", "label_flip", "alie", "ipm",
                               "bulyan_coord", "nan"])
    std: float = opt(200.0, "gaussian: standard deviation of the noise sent", gt=0)
    eps: float = opt(0.1, "ipm: the attackers send -eps x the honest mean", gt=0)
    z: float | None = opt(None, "alie: z (default: from n and f as in Baruch et al.)")
    scale: float = opt(1.0, "bulyan_coord: shift of one coordinate, x sqrt(d) honest stds", gt=0)


@dataclass
class DataConfig:
    name: str = opt("digits", "data set; pick it with data=<name>")
    root: str = opt("~/.cache/squall/data", "directory holding torchvision data sets")
    download: bool = opt(False, "download torchvision data sets into data.root (needs internet)")
    batch_size: int = opt(32, "mini-batch size per worker", ge=1)
    partition: str = opt("iid", "how training data is split across workers",
                         choices=["iid", "classes_per_worker", "dirichlet"])
    classes_per_worker: int = opt(2, "classes each worker holds (partition=classes_per_worker)",
                                  ge=1)
    alpha: float = opt(0.5, "Dirichlet concentration (partition=dirichlet); small = skewed", gt=0)
    test_fraction: float = opt(0.2, "held-out test fraction for data sets without a test split",
                               gt=0, lt=1)
    samples: int = opt(4096, "training samples to generate (data=fake)", ge=1)
    shape: list[int] = opt([3, 32, 32], "image shape C,H,W to generate (data=fake)")
    num_classes: int = opt(10, "classes to generate (data=fake)", ge=2)


@dataclass
class ModelConfig:
    name: str = opt("cnn", "model architecture; pick it with model=<name>")
    width: int = opt(32, "channels of the first conv layer (cnn)", ge=1)
    hidden: int = opt(128, "hidden units (mlp, and the cnn's classifier)", ge=1)


@dataclass
class OptimConfig:
    name: str = opt("sgd", "optimizer run by the driver", choices=["sgd", "adam"])
    lr: float = opt(0.05, "learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = opt(0.0, "L2 weight decay", ge=0)


@dataclass
class CloudConfig:
    name: str = opt("local", "where workers run; pick it with cloud=<name>")
    preempt_prob: float = opt(0.0, "chance each spot worker is reclaimed in a step (simulated)",
                              ge=0, lt=1)
    trace: str = opt("", "spot price history CSV (EC2 layout); workers live while price <= bid")
    bid: float = opt(0.0, "bid in $/h against cloud.trace, or EC2's spot MaxPrice with "
                     "cloud=aws (0: the on-demand price)", ge=0)
    time_scale: float = opt(1.0, "trace seconds per wall-clock second", gt=0)
    instance_type: str = opt("", "trace rows to use (default: the first type in the file)")
    notice_s: float = opt(0.0, "warning before each reclaim, in seconds (0: none)", ge=0)
    replace_delay_s: float = opt(2.0, "seconds until a replacement machine joins", ge=0)
    max_nodes: int = opt(0, "most machines the pool may start in a run (0: no cap)", ge=0)
    on_demand_workers: int = opt(0, "workers placed on on-demand machines, never reclaimed",
                                 ge=0)
    spot_price: float = opt(0.1, "spot price in $/h when there is no trace", ge=0)
    on_demand_price: float = opt(0.4, "on-demand price in $/h", ge=0)
    instance_types: list[str] = opt([], "EC2 instance types to launch, cheapest spot price first "
                                    "(aws)")
    region: str = opt("", "EC2 region (aws; default: boto3's, e.g. $AWS_DEFAULT_REGION)")
    subnets: list[str] = opt([], "subnet ids to launch in, one per AZ (aws; default: the "
                             "default VPC's)")
    security_groups: list[str] = opt([], "security group ids of the instances (aws; default: "
                                     "the VPC's default group)")
    ami: str = opt("", "image with Python, Ray and squall installed (aws)")
    setup: list[str] = opt([], "shell lines the instances run before `ray start` (aws)")
    head_address: str = opt("", "Ray head the instances join (aws; default: the GCS address "
                            "of the driver's Ray)")
    endpoint_url: str = opt("", "EC2 API endpoint (aws; default: AWS's; tests point it at moto)")
    imds_url: str = opt("http://169.254.169.254", "instance metadata service the watchers poll; "
                        "{instance_id} is filled in (aws)")
    imds_poll_s: float = opt(5.0, "seconds between a watcher's looks at the metadata service "
                             "(aws)", gt=0, le=60)
    rebalance: str = opt("drain", "on a rebalance recommendation: drain the worker and replace "
                         "the instance, or ignore it (aws)", choices=["drain", "ignore"])
    launch_rounds: int = opt(3, "rounds over all types and subnets before a launch fails (aws)",
                             ge=1, le=20)
    retry_backoff_s: float = opt(5.0, "wait after a failed round, doubling each round (aws)",
                                 ge=0, le=600)
    local_nodes: bool = opt(False, "tests: a local Ray node stands in for each instance (aws)")


@dataclass
class CheckpointConfig:
    dir: str = opt("", "local path or s3://bucket/prefix (default: <run dir>/checkpoints)")
    every_steps: int = opt(100, "checkpoint every N steps (0: off)", ge=0)
    every_s: float = opt(0.0, "checkpoint when this many seconds passed since the last (0: off)",
                         ge=0)
    keep: int = opt(3, "checkpoints to keep", ge=1)
    replicas: str = opt("all", "gossip: keep every live replica or only their average",
                        choices=["all", "average"])


@dataclass
class RunConfig:
    name: str = opt("", "run name; the run directory is <run.dir>/<run.name> (default: timestamp)")
    dir: str = opt("runs", "parent directory of run directories")


@dataclass
class EvalConfig:
    every: int = opt(50, "evaluate test accuracy every N steps (0: only at the end)", ge=0)
    batch_size: int = opt(1000, "evaluation batch size", ge=1)


@dataclass
class RayConfig:
    address: str | None = opt(None, "Ray cluster to join (default: $RAY_ADDRESS, else start one)")
    num_cpus: int | None = opt(None, "CPUs of a locally started Ray (default: enough for workers)",
                               ge=1)
    dashboard: bool = opt(False, "start the Ray dashboard with a local cluster")


@dataclass
class WorkerConfig:
    device: str = opt("auto", "worker device: auto uses a GPU when the cluster has one",
                      choices=["auto", "cpu", "cuda"])
    num_cpus: float = opt(1.0, "CPUs reserved per worker actor", gt=0)
    step_timeout_s: float = opt(120.0, "a worker silent this long in one step counts as lost",
                                gt=0)
    start_timeout_s: float = opt(300.0, "give up when the workers have not all started by then",
                                 gt=0)


@dataclass
class LogConfig:
    progress: bool = opt(True, "show a progress bar on stderr")
    tensorboard: bool = opt(False, "also write TensorBoard events to <run dir>/tensorboard "
                            "(needs the tensorboard package)")


@dataclass
class Config:
    workers: int = opt(4, "number of worker actors", ge=1)
    steps: int = opt(300, "training steps", ge=1)
    seed: int = opt(0, "random seed (data split, model init, sampling)", ge=0)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------- introspection
@dataclass(frozen=True)
class FieldInfo:
    key: str
    type: Any
    help: str
    meta: dict


def schema_fields(cls: type = Config, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf field of the schema by its dotted key."""
    hints = get_type_hints(cls)
    out: dict[str, FieldInfo] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_fields(hints[f.name], key + "."))
        else:
            out[key] = FieldInfo(key, hints[f.name], f.metadata.get("help", ""), dict(f.metadata))
    return out


def type_name(tp: Any) -> str:
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if get_origin(tp) is list:
        return f"list of {type_name(get_args(tp)[0])}"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def group_options(group: str) -> list[str]:
    folder = resources.files("conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(*parts: str) -> dict:
    path = resources.files("conf").joinpath(*parts)
    return yaml.safe_load(path.read_text()) or {}


# --------------------------------------------------------------------------- overrides
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', parsed value); malformed text raises ConfigError."""
    key, sep, raw = text.partition("=")
    if not sep or not _KEY.match(key):
        raise ConfigError(f"malformed override '{text}': expected key=value, e.g. workers=8 or "
                          "strategy=krum")
    if "," in raw and raw.strip()[:1] not in ("[", "{", "'", '"'):
        raise ConfigError(f"'{text}': a comma-separated value is a sweep; use "
                          f"`squall sweep {text}` or a list in brackets [a,b]")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed value in '{text}': not valid YAML") from None
    return key, value


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelt last part: workers.nmu_cpus -> worker.num_cpus
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.endswith("." + tail) or k == tail][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_range(info: FieldInfo, value: Any) -> None:
    m = info.meta
    if value is None:
        return
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{info.key}={value}: not allowed; valid: {', '.join(m['choices'])}")
    for bound, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if m.get(bound) is not None and not test(value, m[bound]):
            raise ConfigError(f"{info.key}={value}: must be {word} {m[bound]}")


def _set(cfg: DictConfig, info: FieldInfo, value: Any, origin: str) -> None:
    try:
        OmegaConf.update(cfg, info.key, value, merge=False)
    except OmegaConfBaseException:
        raise ConfigError(f"{origin}: expected {type_name(info.type)}") from None


def load_config(overrides: list[str] | None = None) -> Config:
    """Build the validated Config from conf/config.yaml, group choices and overrides."""
    fields = schema_fields()
    base = _read_yaml("config.yaml")
    choices = {g: base.get("defaults", {}).get(g) for g in GROUPS}
    sets: list[tuple[str, Any, str]] = []
    for text in overrides or []:
        key, value = parse_override(text)
        if key in GROUPS:
            valid = group_options(key)
            if value not in valid:
                raise ConfigError(f"{key}={value}: unknown option; valid: {', '.join(valid)}")
            choices[key] = value
        elif key in fields:
            if key.endswith(".name") and key.split(".")[0] in GROUPS:
                raise ConfigError(f"{key}: pick it with {key.split('.')[0]}=<option>")
            sets.append((key, value, text))
        else:
            raise ConfigError(f"unknown key '{key}'{_suggest(key, [*fields, *GROUPS])}")

    cfg = OmegaConf.structured(Config)
    top = {k: v for k, v in base.items() if k != "defaults"}
    for group, option in choices.items():
        top[group] = {**_read_yaml(group, f"{option}.yaml"), "name": option}
    cfg = OmegaConf.merge(cfg, top)
    for key, value, text in sets:
        _set(cfg, fields[key], value, text)

    for key, info in fields.items():
        _check_range(info, OmegaConf.select(cfg, key))
    config = OmegaConf.to_object(cfg)
    _check_combinations(config)
    return config


def _check_gossip(cfg: Config) -> None:
    st = cfg.strategy
    if cfg.byzantine.f:
        raise ConfigError("byzantine.f: Byzantine workers are simulated with the parameter-server "
                          "rules, not with strategy=gossip")
    if st.pre or st.noise:
        raise ConfigError("strategy.pre and strategy.noise apply to parameter-server rules, "
                          "not to strategy=gossip")
    if st.bits not in (1, 2, 4, 8):
        raise ConfigError(f"strategy.bits={st.bits}: not allowed; valid: 1, 2, 4, 8")
    if st.compress == "moniqua" and st.bits == 1 and st.rounding == "stochastic":
        raise ConfigError("strategy.bits=1 needs strategy.rounding=dither or nearest "
                          "(stochastic rounding needs >= 2 bits)")
    if st.gamma is None:
        st.gamma = {1: 0.1, 2: 0.3, 4: 1.0, 8: 1.0}[st.bits] if st.compress == "moniqua" else (
            0.3 if st.compress == "choco" else 1.0)
    if st.compress == "choco" and st.topology == "one_peer_exp":
        raise ConfigError("strategy.compress=choco needs a static topology; valid: ring, torus, "
                          "exponential, complete")


SIMULATED_ONLY = ("preempt_prob", "trace", "notice_s", "on_demand_workers")
AWS_ONLY = ("instance_types", "region", "subnets", "security_groups", "ami", "setup",
            "head_address", "endpoint_url", "imds_url", "imds_poll_s", "rebalance",
            "launch_rounds", "retry_backoff_s", "local_nodes")


def _check_combinations(cfg: Config) -> None:
    """Rules that involve several fields."""
    from strategies.aggregators import check_workers
    from strategies.preaggregation import PREAGGREGATORS

    st, byz = cfg.strategy, cfg.byzantine
    if byz.f >= cfg.workers:
        raise ConfigError(f"byzantine.f={byz.f}: must be < workers={cfg.workers}")
    for step in st.pre:
        if step not in PREAGGREGATORS:
            raise ConfigError(f"strategy.pre={st.pre}: unknown step '{step}'; valid: "
                              f"{', '.join(PREAGGREGATORS)}")
    _check_cloud(cfg)
    if st.name == "gossip":
        _check_gossip(cfg)
        return
    f = byz.f if st.f is None else st.f
    n = -(-cfg.workers // st.bucket_size) if "bucketing" in st.pre else cfg.workers
    if reason := check_workers(st.name, n, f):
        raise ConfigError(f"strategy={st.name} with workers={cfg.workers}: {reason}")
    if st.noise and st.name not in ("median", "sign_vote"):
        raise ConfigError(f"strategy.noise needs strategy=median or sign_vote (got {st.name})")
    if st.m and st.m > cfg.workers - f:
        raise ConfigError(f"strategy.m={st.m}: must be <= workers - f = {cfg.workers - f}")


def _check_cloud(cfg: Config) -> None:
    cloud, defaults = cfg.cloud, CloudConfig()
    for only, keys in (("simulated", SIMULATED_ONLY), ("aws", AWS_ONLY)):
        for key in keys if cloud.name != only else ():
            if getattr(cloud, key) != getattr(defaults, key):
                raise ConfigError(f"cloud.{key} needs cloud={only} (got cloud={cloud.name})")
    if cloud.name == "aws" and not cloud.instance_types:
        raise ConfigError("cloud=aws needs cloud.instance_types, e.g. [g5.xlarge,g4dn.xlarge]")
    if cloud.name == "aws" and not re.match(r"^https?://[^/]", cloud.imds_url):
        raise ConfigError(f"cloud.imds_url={cloud.imds_url}: expected http://host[:port]")
    if cloud.trace and cloud.preempt_prob:
        raise ConfigError("cloud.trace and cloud.preempt_prob are two preemption models; "
                          "set one of them")
    if cloud.on_demand_workers > cfg.workers:
        raise ConfigError(f"cloud.on_demand_workers={cloud.on_demand_workers}: must be <= "
                          f"workers={cfg.workers}")
    if cloud.max_nodes and cloud.max_nodes < cfg.workers:
        raise ConfigError(f"cloud.max_nodes={cloud.max_nodes}: must be >= workers={cfg.workers} "
                          "(or 0 for no cap)")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# --------------------------------------------------------------------------- help
def help_text(command: str = "train") -> str:
    defaults = load_config()
    lines = [f"usage: squall {command} [group=option ...] [key=value ...]", "",
             "Groups (pick one option each; * marks the default):"]
    for g in GROUPS:
        current = getattr(defaults, g).name
        opts = [o + ("*" if o == current else "") for o in group_options(g)]
        lines.append(f"  {g:<10} {' | '.join(opts)}")
    lines += ["", "Fields (key=value; default in brackets):"]
    for key, info in schema_fields().items():
        if key.endswith(".name") and key.split(".")[0] in GROUPS:
            continue
        value = OmegaConf.select(OmegaConf.structured(defaults), key)
        allowed = f" ({'|'.join(info.meta['choices'])})" if info.meta.get("choices") else ""
        lines.append(f"  {key:<28} {info.help}{allowed} [{value}]")
    lines += ["", "Examples:", f"  squall {command} workers=8 steps=500",
              f"  squall {command} strategy=mean data.partition=classes_per_worker "
              "data.classes_per_worker=2"]
    return "\n".join(lines)
