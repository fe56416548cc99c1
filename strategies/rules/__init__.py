"""Byzantine-robust aggregation rules, one file each (pure torch, on whatever device G is).

A rule module defines the rule as a plain function `rule(G, f, ...) -> Tensor[d]` (G: (n, d)
gradients, at most f Byzantine) and registers a constructor with
`@RULES.register(name, description, min_workers=..., requirement=..., params=...)` that takes
the rule's params (an instance of its `params` dataclass, or None) and returns a
`strategies.transforms.Transform`. The registry finds every module of this package, so adding
a rule is one file here plus its test (docs/algorithms.md has the definitions).

Non-finite inputs (the `nan` attack) are treated as far-away outliers: order statistics read
NaN as +inf, distance-based rules give non-finite rows an infinite distance, and rows that
are not selected never leak NaN into the output. `mean` is the non-robust baseline and
propagates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor

from strategies.registry import RULES
from strategies.transforms import Transform


def majority(f: int) -> int:
    """n >= 2f + 1."""
    return 2 * f + 1


def build_rule(name: str, options: object | None = None) -> Transform:
    """Rule `name` as a transform. `options` carries the rule's params by attribute name (the
    strategy config does); None: the params' defaults."""
    entry = RULES.get(name)
    params = None
    if entry.params is not None:
        given = {} if options is None else {
            f.name: getattr(options, f.name) for f in fields(entry.params)}
        params = entry.params(**given)
    return entry.build(params)


def check_workers(name: str, n: int, f: int) -> str | None:
    """None when n workers let rule `name` tolerate f Byzantine ones, else a one-line reason."""
    rule = RULES.get(name)
    if f < 0:
        return f"{name} needs f >= 0, got f={f}"
    need = rule.min_workers(f)
    if n < need:
        return f"{name} needs {rule.requirement} = {need} workers for f={f}, got {n}"
    return None


def require(name: str, G: Tensor, f: int) -> None:
    """Raise ValueError unless G is (n, d) with enough rows for rule `name` and f."""
    if G.dim() != 2:
        raise ValueError(f"{name} expects G of shape (n, d), got {tuple(G.shape)}")
    reason = check_workers(name, G.shape[0], f)
    if reason is not None:
        raise ValueError(reason)


@dataclass(frozen=True)
class Wire:
    """What a worker sends for a rule: `encode` on the worker (flat gradient -> payload),
    `decode` on the receiver ((n, payload) rows, d -> (n, d) gradients), and `forge`: what a
    Byzantine worker can put on that wire (a forged gradient projected onto it)."""

    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor, int], Tensor]
    forge: Callable[[Tensor], Tensor]


def _identity(x: Tensor, *_: object) -> Tensor:
    return x


DENSE = Wire(_identity, _identity, _identity)  # float32 gradients, as computed


def wire(name: str) -> Wire:
    """The wire format of rule `name` (dense unless the rule registers its own)."""
    return (RULES.get(name).extra or {}).get("wire", DENSE)
