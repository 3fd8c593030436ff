"""The component registry: every mask, denominator, advantage, likelihood gradient,
aggregation and regularizer is one function registered under its language name.

    @register("adv", "group_norm")
    def group_norm(inp: AdvInputs) -> Tensor: ...

Adding a component is that function plus its keyword in the grammar; the compiler finds
it here by ``(kind, name)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

KINDS = ("mask", "denom", "adv", "grad", "agg", "kl", "stat")

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}


def register(kind: str, name: str) -> Callable[[F], F]:
    """Register ``fn`` as the component ``kind=name`` (e.g. ``register("adv", "rloo")``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")

    def deco(fn: F) -> F:
        if (kind, name) in _REGISTRY:
            raise ValueError(f"component {kind}={name} is already registered")
        _REGISTRY[(kind, name)] = fn
        return fn

    return deco


def lookup(kind: str, name: str) -> Callable[..., Any]:
    """The function registered as ``kind=name``; a ValueError lists the known names."""
    try:
        return _REGISTRY[(kind, name)]
    except KeyError:
        known = ", ".join(sorted(n for k, n in _REGISTRY if k == kind))
        raise ValueError(f"no {kind} component named {name!r}; known: {known}") from None


def names(kind: str) -> list[str]:
    """All registered names of one kind, sorted."""
    return sorted(n for k, n in _REGISTRY if k == kind)
