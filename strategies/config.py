"""The strategy group's configuration: `strategy=gossip` picks GossipConfig, every other
option (a rule of strategies.registry.RULES) ParameterServerConfig.

ParameterServerConfig is built from the registry: the shared parameter-server options
(_ParameterServerOptions) plus the fields of every registered rule's and pre-aggregation
step's `params` dataclass (multi_krum's m, centered_clip's tau and iters, bucketing's
bucket_size, ...), so a rule with a new option is one file in strategies/rules/. It is made
on first use (the registry imports the rules then): `from strategies.config import
ParameterServerConfig` works, and so does pickling its instances.

Plain Python: no Ray, nothing from orchestrator/ or cloud/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, get_type_hints

from conf.schema import ConfigError, opt
from strategies.registry import COMPRESSORS, PREAGGREGATORS, RULES, TOPOLOGIES, Registry

GOSSIP = "gossip"
GOSSIP_DESCRIPTION = ("decentralized SGD: each worker mixes its model with its neighbours' "
                      "(strategy.topology), messages in fp32 or quantized (strategy.compress)")
# Moniqua's default consensus step size by bits per parameter (choco: 0.3, none: 1).
MONIQUA_GAMMA = {1: 0.1, 2: 0.3, 4: 1.0, 8: 1.0}


@dataclass
class StrategyConfig:
    """What every strategy has: its name (the group option)."""

    name: str = opt("mean", "aggregation rule, or gossip; pick it with strategy=<name>")


@dataclass
class _ParameterServerOptions(StrategyConfig):
    """The options every parameter-server rule shares (the rules' own come from the registry)."""

    f: int | None = opt(None, "Byzantine workers the rule must tolerate (default: byzantine.f)",
                        ge=0)
    pre: list[str] = opt([], "pre-aggregation steps before the rule, e.g. [nnm] or [bucketing]",
                         choices=PREAGGREGATORS)
    noise: float = opt(0.0, "median/sign_vote: workers add noise*N(0,I) first (Chen et al.)",
                       ge=0)
    on_too_few: str = opt("skip", "when too few live workers remain for the rule's guarantee",
                          choices=["skip", "fail"])


@dataclass
class GossipConfig(StrategyConfig):
    """strategy=gossip: decentralized SGD with (optionally quantized) neighbour messages."""

    name: str = opt(GOSSIP, "aggregation rule, or gossip; pick it with strategy=<name>")
    topology: str = opt("ring", "gossip: who talks to whom", choices=TOPOLOGIES)
    compress: str = opt("none", "gossip: message format (none = fp32 D-PSGD)",
                        choices=COMPRESSORS)
    bits: int = opt(2, "gossip moniqua: bits per parameter",
                    choices=sorted(MONIQUA_GAMMA))
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

    def check(self) -> None:
        """Rules across fields; ConfigError on one line."""
        if self.compress == "moniqua" and self.bits == 1 and self.rounding == "stochastic":
            raise ConfigError("strategy.bits=1 needs strategy.rounding=dither or nearest "
                              "(stochastic rounding needs >= 2 bits)")
        if self.compress == "choco" and _time_varying(self.topology):
            static = [t for t in TOPOLOGIES.names() if not _time_varying(t)]
            raise ConfigError("strategy.compress=choco needs a static topology; valid: "
                              f"{', '.join(static)}")


def _time_varying(topology: str) -> bool:
    """Whether the topology's graph changes from step to step (its registry entry says so in
    extra={"time_varying": True})."""
    if topology not in TOPOLOGIES:
        return False
    return bool((TOPOLOGIES.get(topology).extra or {}).get("time_varying"))


def gossip_gamma(st: GossipConfig) -> float:
    """The consensus step size: strategy.gamma, else the default for the compressor and bits
    (moniqua: MONIQUA_GAMMA[bits]; choco: 0.3; none: 1, plain D-PSGD mixing)."""
    if st.gamma is not None:
        return st.gamma
    if st.compress == "moniqua":
        return MONIQUA_GAMMA[st.bits]
    return 0.3 if st.compress == "choco" else 1.0


# --------------------------------------------------------------------------- from the registry
def _registry_fields(registries: tuple[Registry, ...], taken: set[str]) -> list[tuple]:
    """(name, type, field) of every registered entry's params, for make_dataclass. A name two
    entries declare alike is one field; declared differently (or clashing with a shared
    option) it is an error of the entries, raised here."""
    found: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    for registry in registries:
        for entry in registry.entries():
            if entry.params is None:
                continue
            hints = get_type_hints(entry.params)
            for f in dataclasses.fields(entry.params):
                if f.name in taken:
                    raise TypeError(f"{registry.kind} {entry.name!r}: option {f.name!r} is a "
                                    "shared strategy option")
                if f.name in found:
                    owner, tp, other = found[f.name]
                    if tp != hints[f.name] or _default(other) != _default(f):
                        raise TypeError(f"{registry.kind} {entry.name!r}: option {f.name!r} "
                                        f"is declared differently by {owner!r}")
                    continue
                found[f.name] = (entry.name, hints[f.name], _field_for(entry.name, f))
    return [(name, tp, fld) for name, (_, tp, fld) in found.items()]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"option {f.name!r} has no default")


def _field_for(owner: str, f: dataclasses.Field) -> dataclasses.Field:
    """A copy of the entry's field whose help names the entry (`multi_krum: ...`)."""
    meta = {"choices": None, "ge": None, "gt": None, "le": None, "lt": None, **f.metadata}
    help_ = meta.get("help") or f.name
    if not help_.startswith(owner):
        help_ = f"{owner}: {help_}"
    meta["help"] = help_
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=meta)
    return dataclasses.field(default=_default(f), metadata=meta)


def _make_parameter_server_config() -> type:
    taken = {f.name for f in dataclasses.fields(_ParameterServerOptions)}
    cls = dataclasses.make_dataclass(
        "ParameterServerConfig", _registry_fields((RULES, PREAGGREGATORS), taken),
        bases=(_ParameterServerOptions,))
    cls.__module__ = __name__  # importable (and picklable) as strategies.config.<name>
    cls.__doc__ = ("A parameter-server rule's options: the shared ones and every registered "
                   "rule's and pre-aggregation step's params.")
    return cls


def _parameter_server_config() -> type:
    cls = globals().get("ParameterServerConfig")
    if cls is None:  # made once, on first use, from the registry
        cls = globals()["ParameterServerConfig"] = _make_parameter_server_config()
    return cls


def __getattr__(name: str) -> Any:
    if name == "ParameterServerConfig":
        return _parameter_server_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def strategy_config_class(name: str) -> type[StrategyConfig]:
    """The config class of strategy=<name>: GossipConfig for gossip, else
    ParameterServerConfig."""
    if name == GOSSIP:
        return GossipConfig
    return _parameter_server_config()


def strategy_options() -> list[str]:
    """Every valid strategy=<option>: the registered rules and gossip, sorted."""
    return sorted({*RULES.names(), GOSSIP})


def strategy_description(name: str) -> str:
    """The option's one line for --help: the registry's description and requirement."""
    if name == GOSSIP:
        return GOSSIP_DESCRIPTION
    entry = RULES.get(name)
    return entry.description + (f" (needs {entry.requirement})" if entry.requirement else "")
