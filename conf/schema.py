"""The pieces every config dataclass is made of: `opt` (a field with its help text and
allowed values) and `ConfigError` (a user mistake, reported on one line with exit status 2).
Plain Python, so every layer can use it: cloud/ and strategies/ keep their config beside
their code without importing orchestrator/."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line meant for the terminal."""


def opt(default: Any, help: str, *, choices: Any = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values. `choices` is a list of
    names or a registry (anything with .names()), read when the value is checked."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
