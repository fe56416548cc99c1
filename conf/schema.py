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
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice_names(choices: Any) -> list:
    """The allowed values of a field: its list, or its registry's names now."""
    if choices is None:
        return []
    if hasattr(choices, "names"):
        return list(choices.names())
    return list(choices)


def check_value(key: str, meta: dict, value: Any) -> None:
    """ConfigError (one line) when `value` breaks the field's choices or bounds. A list value
    is checked item by item against the choices."""
    if value is None:
        return
    if meta.get("choices") is not None:
        valid = choice_names(meta["choices"])
        listed = ", ".join(str(v) for v in valid)
        if isinstance(value, (list, tuple)):
            for item in value:
                if item not in valid:
                    noun = getattr(meta["choices"], "kind", "value").split()[-1]
                    raise ConfigError(f"{key}={list(value)}: unknown {noun} '{item}'; "
                                      f"valid: {listed}")
        elif value not in valid and not (meta.get("any_case") and str(value).lower() in {
                str(v).lower() for v in valid}):
            raise ConfigError(f"{key}={value}: not allowed; valid: {listed}")
    for bound, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if meta.get(bound) is not None and not test(value, meta[bound]):
            raise ConfigError(f"{key}={value}: must be {word} {meta[bound]}")
