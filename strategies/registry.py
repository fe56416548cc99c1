"""One registry for every pluggable piece of math: robust rules, pre-aggregation steps,
attacks, gossip compressors and topologies.

An entry is a name, a constructor, a one-line description (it feeds `squall train --help`,
the README tables and the config's allowed values) and, for rules, the smallest worker count
that tolerates f Byzantine workers. An unknown name raises `UnknownName` listing the valid
ones. Entries register themselves where they are defined (`@RULES.register(...)`); the
registry imports the defining modules on first use, so adding a robust rule is one file in
strategies/rules/ (see docs/algorithms.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class UnknownName(KeyError):
    """A name no entry has; str() is the one-line message listing the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered piece.

    build: the constructor (what it takes depends on the kind; see each module).
    params: a dataclass of the options the entry adds to its config group (fields with
        metadata "help" and optional bounds "ge", "gt", "le", "lt"), or None.
    min_workers: for rules, f -> the smallest n that tolerates f Byzantine workers.
    requirement: the same as text, e.g. "n >= 2f+3".
    """

    name: str
    build: Callable[..., Any]
    description: str
    params: type | None = None
    min_workers: Callable[[int], int] | None = None
    requirement: str = ""
    extra: dict | None = None  # kind-specific facts (e.g. an attack's data_side)


# Modules that define entries, imported on first use (they import this module).
_DEFINERS = {
    "aggregator": ["strategies.rules"],
    "pre-aggregation step": ["strategies.preaggregation"],
    "attack": ["strategies.attacks"],
    "compressor": ["strategies.consensus"],
    "topology": ["strategies.topology"],
}


class Registry:
    """Entries of one kind by name: in registration order, or by name where each entry is a
    module of its own (import order would decide otherwise)."""

    def __init__(self, kind: str, by_name: bool = False) -> None:
        self.kind, self.by_name = kind, by_name
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, description: str, **facts: Any) -> Callable:
        """Decorator: register the decorated constructor as `name`."""

        def add(build: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, build, description, **facts)
            return build

        return add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in _DEFINERS.get(self.kind, []):
            package = importlib.import_module(module)
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{module}.{info.name}")

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: "
                              f"{', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries) if self.by_name else list(self._entries)

    def entries(self) -> Iterator[Entry]:
        return iter([self._entries[name] for name in self.names()])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


RULES = Registry("aggregator", by_name=True)
PREAGGREGATORS = Registry("pre-aggregation step")
ATTACKS = Registry("attack")
COMPRESSORS = Registry("compressor")
TOPOLOGIES = Registry("topology")
