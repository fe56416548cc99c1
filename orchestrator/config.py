"""Configuration: structured dataclasses, YAML groups in conf/, and command-line overrides.

The grammar follows Hydra's basic override syntax:
  group=option   pick an option of a group (e.g. strategy=krum); conf/<group>/<option>.yaml,
                 when there is one, sets that option's defaults
  a.b=value      set one field (value parsed as YAML: 3, 0.1, true, null, [a, b])
Every field carries a one-line help text and its allowed range; `squall train --help` prints them.

Each layer keeps its config beside its code: cloud/config.py (one class per pool, RayConfig,
JobSpec) and strategies/config.py (ParameterServerConfig, built from the registry, and
GossipConfig). The option of a family group picks its schema class: cloud=simulated makes
cfg.cloud a SimulatedCloudConfig, strategy=gossip makes cfg.strategy a GossipConfig (any other
strategy a ParameterServerConfig), so a key of another option is a one-line error.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cloud.config import CLOUDS, CloudConfig, JobSpec, RayConfig, cloud_config_class
from conf.schema import ConfigError, check_value, choice_names, opt
from orchestrator.optimizer import OptimConfig, check_optimizer
from strategies.config import (
    GOSSIP,
    GossipConfig,
    StrategyConfig,
    gossip_gamma,
    strategy_config_class,
    strategy_description,
    strategy_options,
)
from strategies.registry import ATTACKS

GROUPS = ("strategy", "data", "model", "cloud")
TARGET_GROUPS = ("data", "model")  # groups whose built-in options are targets too
CUSTOM = "custom"  # their option when the user gives the target
FAMILIES = ("strategy", "cloud")  # groups whose option picks the schema class

__all__ = ["CloudConfig", "Config", "ConfigError", "GossipConfig", "JobSpec", "RayConfig",
           "StrategyConfig", "job_spec", "load_config", "opt", "repeated_overrides", "shown"]


# --------------------------------------------------------------------------- schema
@dataclass
class ByzantineConfig:
    f: int = opt(0, "simulated Byzantine workers (which ones is fixed by seed)", ge=0)
    attack: str = opt("sign_flip", "what the Byzantine workers send", choices=ATTACKS)
    std: float = opt(200.0, "gaussian: standard deviation of the noise sent", gt=0)
    eps: float = opt(0.1, "ipm: the attackers send -eps x the honest mean", gt=0)
    z: float | None = opt(None, "alie: z (default: from n and f as in Baruch et al.)")
    scale: float = opt(1.0, "bulyan_coord: shift of one coordinate, x sqrt(d) honest stds", gt=0)


@dataclass
class DataConfig:
    name: str = opt("digits", "built-in data set; pick it with data=<name> (or give data.target)")
    target: str = opt("", "module:callable called as fn(split, **data.args) for split train "
                      "and test, returning a map-style Dataset of (input, label) pairs")
    args: dict[str, Any] = opt({}, "keyword arguments of the data factory, e.g. "
                               "data.args.samples=512")
    root: str = opt("~/.cache/squall/data", "where the data lives, passed as root= to a "
                    "factory that takes it: a local directory or s3://bucket/prefix (copied "
                    "to data.cache on each node)")
    cache: str = opt("~/.cache/squall/s3", "local copy of an s3:// data.root, on each node")
    batch_size: int = opt(32, "mini-batch size per worker", ge=1)
    loader_workers: int = opt(0, "DataLoader worker processes per worker actor (0: in the "
                              "actor)", ge=0)
    partition: str = opt("iid", "how training data is split across workers",
                         choices=["iid", "classes_per_worker", "dirichlet"])
    classes_per_worker: int = opt(2, "classes each worker holds (partition=classes_per_worker)",
                                  ge=1)
    alpha: float = opt(0.5, "Dirichlet concentration (partition=dirichlet); small = skewed", gt=0)


@dataclass
class ModelConfig:
    name: str = opt("cnn", "built-in model; pick it with model=<name> (or give model.target)")
    target: str = opt("", "module:callable that builds the model, called with model.args")
    args: dict[str, Any] = opt({}, "keyword arguments of the model factory, e.g. "
                               "model.args.width=64")


@dataclass
class LossConfig:
    target: str = opt("", "module:callable fn(model, batch) -> scalar loss tensor "
                      "(default: cross entropy of model(inputs) against the labels)")


@dataclass
class CheckpointConfig:
    dir: str = opt("", "local path or s3://bucket/prefix (default: <run dir>/checkpoints)")
    every_steps: int = opt(100, "checkpoint every N steps (0: only at the end and on a stop)",
                           ge=0)
    every_s: float = opt(0.0, "checkpoint when this many seconds passed since the last (0: off)",
                         ge=0)
    keep: int = opt(3, "checkpoints to keep", ge=1)
    part_mb: int = opt(64, "s3://: a checkpoint larger than this goes up as a multipart "
                       "upload in parts of this size (MiB), each with a SHA-256 checksum", ge=5)
    replicas: str = opt("all", "gossip: keep every live replica or only their average",
                        choices=["all", "average"])


@dataclass
class RunConfig:
    name: str = opt("", "run name; the run directory is <run.dir>/<run.name> (default: timestamp)")
    dir: str = opt("runs", "parent directory of run directories")
    restarts: int = opt(0, "relaunch the driver up to N times when it dies (a crash, SIGKILL, "
                        "out of memory; not a user error or a stop signal): each relaunch "
                        "resumes the run from its newest checkpoint", ge=0)


@dataclass
class EvalConfig:
    every: int = opt(50, "evaluate on the test split every N steps (0: only at the end)", ge=0)
    batch_size: int = opt(1000, "evaluation batch size", ge=1)
    target: str = opt("", "module:callable fn(model, dataset) -> dict of floats, logged "
                      "with the test accuracy (or test_loss with a loss.target)")
    on: str = opt("driver", "where evaluation runs: the driver, or a worker (for models too "
                  "big for the driver; the driver then loads no data)",
                  choices=["driver", "worker"])


@dataclass
class WorkerConfig:
    device: str = opt("auto", "worker device: auto uses a GPU when the cluster has one",
                      choices=["auto", "cpu", "cuda"])
    num_cpus: float = opt(1.0, "CPUs reserved per worker actor", gt=0)
    step_timeout_s: float = opt(120.0, "a worker silent this long in one step counts as lost",
                                gt=0)
    start_timeout_s: float = opt(300.0, "give up when the workers have not all started by then",
                                 gt=0)
    grad_accum: int = opt(1, "micro-batches of data.batch_size per gradient (gradient "
                          "accumulation: their mean is the worker's gradient)", ge=1)
    precision: str = opt("fp32", "bf16: forward and loss under bfloat16 autocast (gradients "
                         "and parameters stay float32)", choices=["fp32", "bf16"])
    plane: str = opt("auto", "how gradients meet: collective (the workers exchange them among "
                     "themselves, gloo/NCCL, and step on their own: mean by all-reduce; the other "
                     "rules sharded by blocks of coordinates), "
                     "driver (each step "
                     "through the driver: every rule and attack), auto (collective for mean "
                     "without Byzantine workers, else driver)",
                     choices=["auto", "collective", "driver"])
    steps_per_call: int = opt(8, "plane=collective: steps the workers run per call from the "
                              "driver (fewer while a replacement is starting)", ge=1)


@dataclass
class LogConfig:
    progress: bool = opt(True, "show a progress bar on stderr (evaluation lines print "
                          "either way)")
    tensorboard: bool = opt(False, "also write TensorBoard events to <run dir>/tensorboard "
                            "(needs the tensorboard package)")


def _default_strategy() -> StrategyConfig:
    return strategy_config_class("mean")()


@dataclass
class Config:
    workers: int = opt(4, "number of worker actors", ge=1)
    steps: int = opt(300, "training steps", ge=1)
    seed: int = opt(0, "random seed (data split, model init, sampling)", ge=0)
    # ParameterServerConfig or GossipConfig (strategies/config.py), picked by strategy=<name>
    strategy: StrategyConfig = field(default_factory=_default_strategy)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)
    # CloudConfig or its subclass for the pool (cloud/config.py), picked by cloud=<name>
    cloud: CloudConfig = field(default_factory=CloudConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    log: LogConfig = field(default_factory=LogConfig)


def job_spec(cfg: Config) -> JobSpec:
    """What a pool needs from outside its cloud slice: make_pool(cfg.cloud, job_spec(cfg))."""
    return JobSpec(workers=cfg.workers, seed=cfg.seed, run_name=cfg.run.name,
                   worker_num_cpus=cfg.worker.num_cpus, ray=cfg.ray)


# --------------------------------------------------------------------------- family groups
def schema_class(group: str, option: str) -> type:
    """The schema of a family group's option: cloud=simulated -> SimulatedCloudConfig,
    strategy=gossip -> GossipConfig, strategy=<rule> -> ParameterServerConfig."""
    if group == "strategy":
        return strategy_config_class(option)
    return cloud_config_class(option)


def family_schemas(group: str) -> dict[str, type]:
    """Each schema class of a family group by a label for --help, in a stable order."""
    if group == "strategy":
        return {"the parameter-server rules (every strategy but gossip)":
                strategy_config_class("mean"), f"strategy={GOSSIP}": GossipConfig}
    labels: dict[type, list[str]] = {}
    for option, cls in CLOUDS.items():
        labels.setdefault(cls, []).append(option)
    return {f"cloud={' and '.join(options)}": cls for cls, options in labels.items()}


def _foreign_key(key: str, group: str, option: str) -> str:
    """The one-line error for a key that the chosen option's schema lacks."""
    name = key.split(".", 1)[1]
    if group == "strategy":
        if option == GOSSIP:
            return f"{key} applies to parameter-server rules, not to strategy={GOSSIP}"
        return f"{key} needs strategy={GOSSIP} (got strategy={option})"
    owners = [o for o, cls in CLOUDS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    needs = " or ".join(f"cloud={o}" for o in owners)
    return f"{key} needs {needs} (got cloud={option})"


# --------------------------------------------------------------------------- introspection
@dataclass(frozen=True)
class FieldInfo:
    key: str
    type: Any
    help: str
    meta: dict


def schema_fields(cls: type = Config, prefix: str = "",
                  schemas: dict[str, type] | None = None) -> dict[str, FieldInfo]:
    """Every leaf field of the schema by its dotted key. A family group (strategy, cloud)
    contributes the fields of the class in `schemas`, else of all its classes (every key
    any option knows)."""
    hints = get_type_hints(cls)
    out: dict[str, FieldInfo] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if cls is Config and f.name in FAMILIES:
            chosen = (schemas or {}).get(f.name)
            for family in [chosen] if chosen else family_schemas(f.name).values():
                for k, info in schema_fields(family, key + ".").items():
                    out.setdefault(k, info)
        elif dataclasses.is_dataclass(hints[f.name]):
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
    """A group's options: registered rules and gossip (strategy), pools (cloud), YAML files in
    conf/<group>/ (data, model)."""
    if group == "strategy":
        return strategy_options()
    if group == "cloud":
        return sorted(CLOUDS)
    folder = resources.files("conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(*parts: str) -> dict:
    """A YAML file of conf/ ({} when there is none: an option needs no file)."""
    path = resources.files("conf").joinpath(*parts)
    if not path.is_file():
        return {}
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


def repeated_overrides(overrides: list[str]) -> list[str]:
    """One note per key or group given more than once (the last one wins, as in load_config):
    'workers given twice; using workers=3'."""
    counts: collections.Counter[str] = collections.Counter()
    last: dict[str, str] = {}
    for text in overrides:
        key, sep, _ = text.partition("=")
        if sep:
            counts[key] += 1
            last[key] = text
    return [f"{key} given {'twice' if n == 2 else f'{n} times'}; using {last[key]}"
            for key, n in counts.items() if n > 1]


def shown(key: str, value: Any) -> str:
    """'key=value' for a message, a long value cut short with its length."""
    text = str(value)
    if len(text) > 240:
        return f"{key}={text[:24]}... ({len(text)} characters)"
    return f"{key}={text}"


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelt last part: workers.nmu_cpus -> worker.num_cpus
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.endswith("." + tail) or k == tail][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def _dict_field(key: str, fields: dict[str, FieldInfo]) -> FieldInfo | None:
    """The field that `key` names, or the dict field it is an entry of (optim.args.betas)."""
    if key in fields:
        return fields[key]
    parent = key.rpartition(".")[0]
    info = fields.get(parent)
    return info if info is not None and get_origin(info.type) is dict else None


def _set(cfg: DictConfig, key: str, info: FieldInfo, value: Any, origin: str) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException:
        raise ConfigError(f"{origin}: expected {type_name(info.type)}") from None


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_config(overrides: list[str] | None = None) -> Config:
    """Build the validated Config from conf/config.yaml, group choices and overrides."""
    every_field = schema_fields()
    base = _read_yaml("config.yaml")
    choices = {g: base.get("defaults", {}).get(g) for g in GROUPS}
    sets: list[tuple[str, Any, str]] = []
    picked: set[str] = set()
    for text in overrides or []:
        key, value = parse_override(text)
        if key in GROUPS:
            valid = group_options(key)
            if value not in valid:
                raise ConfigError(f"{key}={value}: unknown option; valid: {', '.join(valid)}")
            choices[key] = value
            picked.add(key)
        elif _dict_field(key, every_field) is not None:
            if key.endswith(".name") and key.split(".")[0] in GROUPS:
                raise ConfigError(f"{key}: pick it with {key.split('.')[0]}=<option>")
            sets.append((key, value, text))
        else:
            raise ConfigError(f"unknown key '{key}'{_suggest(key, [*every_field, *GROUPS])}")

    _own_targets(choices, picked, sets)
    # the family groups' options pick their schema classes
    schemas = {g: schema_class(g, choices[g]) for g in FAMILIES}
    fields = schema_fields(schemas=schemas)
    for key, _, _ in sets:
        if _dict_field(key, fields) is None:
            group = key.split(".")[0]
            raise ConfigError(_foreign_key(key, group, choices[group]))
    cfg = OmegaConf.structured(Config(**{g: cls() for g, cls in schemas.items()}))
    top = {k: v for k, v in base.items() if k != "defaults"}
    for group, option in choices.items():
        values = _read_yaml(group, f"{option}.yaml")
        for key in values:
            if f"{group}.{key}" not in fields:
                raise ConfigError(f"conf/{group}/{option}.yaml: unknown key '{key}'")
        top[group] = {**values, "name": option}
    cfg = OmegaConf.merge(cfg, top)
    for key, value, text in sets:
        _set(cfg, key, _dict_field(key, fields), value, text)

    config = OmegaConf.to_object(cfg)
    for key, info in fields.items():
        check_value(key, info.meta, _value(config, key))
    _check_combinations(config)
    _resolve_defaults(config)
    return config


def _own_targets(choices: dict[str, str], picked: set[str],
                 sets: list[tuple[str, Any, str]]) -> None:
    """model.target / data.target replace the built-in option: the group's option becomes
    'custom' (no YAML defaults); naming both is a one-line error."""
    for group in TARGET_GROUPS:
        given = [text for key, value, text in sets if key == f"{group}.target" and value]
        if not given:
            continue
        if group in picked:
            raise ConfigError(f"{given[-1]}: give either {group}=<option> or {group}.target, "
                              "not both")
        choices[group] = CUSTOM


def _resolve_defaults(cfg: Config) -> None:
    """Fill the defaults that depend on other fields (not a check): strategy.gamma of gossip,
    so that the resolved config shows the step size the run uses."""
    if isinstance(cfg.strategy, GossipConfig):
        cfg.strategy.gamma = gossip_gamma(cfg.strategy)


def _check_gossip_optim(optim: OptimConfig) -> None:
    """Gossip workers run their own SGD with momentum at a constant rate."""
    defaults = OptimConfig()
    for key in ("name", "args", "schedule", "warmup_steps", "clip_norm"):
        if getattr(optim, key) != getattr(defaults, key) and not (
                key == "name" and optim.name.lower() == "sgd"):
            raise ConfigError(f"optim.{key} applies to the parameter-server rules; gossip "
                              "workers run SGD with momentum at optim.lr")


def _check_attack(cfg: Config) -> None:
    """An attack that cannot be forged even with every worker present would skip every step."""
    from strategies.attacks import AttackUndefined, alie_z

    byz = cfg.byzantine
    if byz.f and byz.attack == "alie" and byz.z is None:
        try:
            alie_z(cfg.workers, byz.f)
        except AttackUndefined:
            raise ConfigError(f"byzantine.attack=alie with workers={cfg.workers}, byzantine.f="
                              f"{byz.f}: the default z is undefined (no majority to win over);"
                              " set byzantine.z") from None


def _check_combinations(cfg: Config) -> None:
    """Rules that involve several fields (each family's own: its class's check())."""
    from strategies.rules import check_workers  # torch: the rules are loaded by now anyway

    st, byz = cfg.strategy, cfg.byzantine
    _check_run_name(cfg.run.name)
    if byz.f >= cfg.workers:
        raise ConfigError(f"byzantine.f={byz.f}: must be < workers={cfg.workers}")
    cfg.cloud.check(cfg.workers)
    if cfg.worker.plane == "collective" and (reason := _not_collective(cfg)):
        raise ConfigError(f"worker.plane=collective: {reason}; use worker.plane=driver or auto")
    if isinstance(st, GossipConfig):
        if cfg.workers < 2:
            raise ConfigError(f"strategy={GOSSIP} with workers={cfg.workers}: gossip needs at "
                              "least 2 workers")
        if byz.f:
            raise ConfigError("byzantine.f: Byzantine workers are simulated with the "
                              "parameter-server rules, not with strategy=gossip")
        _check_gossip_optim(cfg.optim)
        st.check()
        return
    f = byz.f if st.f is None else st.f
    check_optimizer(cfg.optim)
    _check_attack(cfg)
    n = _rows_after_preaggregation(st, cfg.workers)
    if reason := check_workers(st.name, n, f):
        raise ConfigError(f"strategy={st.name} with workers={cfg.workers}: {reason}")
    if st.noise and st.name not in ("median", "sign_vote"):
        raise ConfigError(f"strategy.noise needs strategy=median or sign_vote (got {st.name})")
    m = getattr(st, "m", 0)
    if m and m > cfg.workers - f:
        raise ConfigError(f"strategy.m={m}: must be <= workers - f = {cfg.workers - f}")


def _not_collective(cfg: Config) -> str:
    """Why the collective plane cannot run this job ('' when it can). It runs every rule,
    pre-aggregation step and attack (orchestrator/collective.py: by blocks of coordinates)."""
    if isinstance(cfg.strategy, GossipConfig):
        return "strategy=gossip has its own plane"
    return ""


def plain_mean(cfg: Config) -> bool:
    """strategy=mean without Byzantine workers, pre-aggregation or noise: one all-reduce."""
    st = cfg.strategy
    return not isinstance(st, GossipConfig) and st.name == "mean" and not (
        cfg.byzantine.f or st.pre or st.noise)


def uses_collective_plane(cfg: Config) -> bool:
    """worker.plane resolved: collective, or with auto where the job is plain averaging
    (a robust rule on the collective plane is asked for by name, worker.plane=collective)."""
    return cfg.worker.plane == "collective" or (cfg.worker.plane == "auto" and plain_mean(cfg))


def _check_run_name(name: str) -> None:
    """run.name names a directory inside run.dir: relative, no '..' parts, no control
    characters (what the file system makes of it is checked by orchestrator.preflight)."""
    if not name:
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(f"{shown('run.name', repr(name))}: control characters are not allowed")
    parts = name.split("/")
    if os.path.isabs(name) or ".." in parts:
        raise ConfigError(f"{shown('run.name', name)}: must name a directory inside run.dir "
                          "(a relative path without '..' parts)")
    if all(p in ("", ".") for p in parts):
        raise ConfigError(f"{shown('run.name', name)}: must name a directory inside run.dir "
                          "(use run.dir to choose the parent)")


def _rows_after_preaggregation(st: StrategyConfig, n: int) -> int:
    """The rows the rule gets from n workers after strategy.pre (bucketing: ceil(n/s))."""
    from strategies.preaggregation import preaggregation_chain
    from strategies.transforms import Transform

    identity = Transform(lambda: None, lambda G, f, state, generator=None: (G, state))
    return preaggregation_chain(st.pre, st, identity).rows(n)


REDACTED = "<redacted>"


def _redacted(obj: Any) -> Any:
    """A copy of a config dataclass whose fields marked secret (metadata secret=True, e.g.
    cloud.setup) hold REDACTED instead of their value (a list: [REDACTED]; empty stays)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret") and value:
            changes[f.name] = [REDACTED] if isinstance(value, (list, tuple)) else REDACTED
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _redacted(value)
    if not changes:
        return obj
    return dataclasses.replace(obj, **changes)


def to_yaml(cfg: Config) -> str:
    """The config as stored in config.yaml and printed by `squall config` (secrets redacted)."""
    return OmegaConf.to_yaml(OmegaConf.structured(_redacted(cfg)))


def to_dict(cfg: Config) -> dict:
    """The config as stored in checkpoint manifests (secrets redacted)."""
    return OmegaConf.to_container(OmegaConf.structured(_redacted(cfg)))


# --------------------------------------------------------------------------- help
def _field_lines(fields: dict[str, FieldInfo], defaults: Any, prefix: str = "") -> list[str]:
    """One line per field: key, help, allowed values and the default (read from `defaults`
    by the key without `prefix`)."""
    lines = []
    for key, info in fields.items():
        if key.endswith(".name") and key.split(".")[0] in GROUPS:
            continue
        names = choice_names(info.meta.get("choices"))
        allowed = f" ({'|'.join(str(c) for c in names)})" if names else ""
        value = _value(defaults, key.removeprefix(prefix))
        lines.append(f"  {key:<28} {info.help}{allowed} [{value}]")
    return lines


def _family_help(group: str) -> list[str]:
    """The fields of a family group, grouped by the options that have them: the fields every
    option has first, then each schema class's own."""
    families = family_schemas(group)
    per_class = {label: schema_fields(cls, group + ".") for label, cls in families.items()}
    common = set.intersection(*(set(f) for f in per_class.values()))
    first_label, first_cls = next(iter(families.items()))
    shared = {k: v for k, v in per_class[first_label].items() if k in common}
    shared_lines = _field_lines(shared, first_cls(), group + ".")  # (name is never listed)
    lines = ["", f"{group} fields of every {group}:", *shared_lines] if shared_lines else []
    for label, cls in families.items():
        own = {k: v for k, v in per_class[label].items() if k not in common}
        if own:
            lines += ["", f"{group} fields of {label}:"]
            lines += _field_lines(own, cls(), group + ".")
    return lines


def help_text(command: str = "train") -> str:
    defaults = load_config()
    lines = [f"usage: squall {command} [group=option ...] [key=value ...]", "",
             "Groups (pick one option each; * marks the default):"]
    for g in GROUPS:
        current = getattr(defaults, g).name
        opts = [o + ("*" if o == current else "") for o in group_options(g)]
        lines.append(f"  {g:<10} {' | '.join(opts)}")
    lines += ["", "Strategies (strategy=<name>):"]
    lines += [f"  {name:<16} {strategy_description(name)}" for name in strategy_options()]
    lines += ["", "Fields (key=value; default in brackets):"]
    shared = {k: v for k, v in schema_fields().items() if k.split(".")[0] not in FAMILIES}
    lines += _field_lines(shared, defaults)
    for group in FAMILIES:
        lines += _family_help(group)
    lines += ["", "Examples:", f"  squall {command} workers=8 steps=500",
              f"  squall {command} model.target=mymodule:make_model "
              "data.target=mymodule:make_data   # your own (README: Train your own model)",
              f"  squall {command} strategy=mean data.partition=classes_per_worker "
              "data.classes_per_worker=2",
              f"  squall {command} strategy=gossip strategy.topology=ring "
              "strategy.compress=moniqua strategy.bits=2"]
    return "\n".join(lines)
