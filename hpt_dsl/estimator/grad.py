"""Likelihood gradients: the function f applied to the likelihood quantity x.

    loglik     f(x) = x                  (plain policy gradient)
    shaped(g)  f(x) = x / (x + g)        (LUFFY's policy shaping; grad f = g / (x + g)^2 * grad x)

``shaped`` replaces the ratio (denom=pi_old, pi_old_seq) or pi_theta (denom=1); it is not
defined on log pi_theta (denom=pi_theta).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from hpt_dsl.estimator.registry import register

Shape = Callable[[Tensor], Tensor]


@register("grad", "loglik")
def loglik() -> Shape:
    """f(x) = x."""
    return lambda x: x


@register("grad", "shaped")
def shaped(g: float) -> Shape:
    """f(x) = x / (x + g)."""
    g = float(g)
    return lambda x: x / (x + g)
