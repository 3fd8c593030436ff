"""Stabilisation masks 1_stable: which tokens keep their gradient.

Each mask returns the per-token objective J_t (the loss is -sum c * J, see program.py) and
the boolean tensor of tokens it switched off (for the clip fraction), from the advantage
A = A_hat, the likelihood quantity x, its ratio rho (see denom.py) and the shaping f
(see grad.py):

    none               J = A * f(x)
    clip(lo, hi)       J = min(A * f(x), A * f(clip(rho, 1 - lo, 1 + hi)))             (PPO)
                         i.e. zero gradient exactly where A > 0 and rho > 1 + hi, or A < 0 and rho < 1 - lo
    dual_clip(lo,hi,c) as clip, and for A < 0 the objective is floored at c * A (zero gradient there)
    cispo(hi)          J = sg(min(rho, 1 + hi)) * A * log pi_theta                       (CISPO)
    seq_clip(lo, hi)   as clip, with rho replaced by the sequence ratio s_i                (GSPO)

J may be (b, 1), one value per row, when x is a sequence-level quantity. A mask that never
differentiates x sets ``uses_x = False`` and gets x without a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.denom import Likelihood, TokenInputs
from hpt_dsl.estimator.grad import Shape
from hpt_dsl.estimator.registry import register

MaskOut = tuple[Tensor, "Tensor | None"]


def _pessimistic(
    t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float, rho: Tensor | None = None
) -> MaskOut:
    """min(A f(x), A f(clip(rho, 1 - lo, 1 + hi))), with exactly zero gradient on clipped tokens.

    When x carries the ratio itself (and no other ratio is given) this is PPO's own form,
    min(A f(x), A f(clamp(x))): inside the range both sides are x and share its gradient,
    outside it the clamped side is constant. Otherwise the clipped tokens are selected.
    """
    adv = t.adv
    if rho is None and lik.x_is_rho:
        obj = adv * f(lik.x)
        capped = adv * f(lik.x.clamp(1 - lo, 1 + hi))
        return torch.minimum(obj, capped), capped.detach() < obj.detach()
    rho = lik.rho if rho is None else rho
    clipped = ((adv > 0) & (rho > 1 + hi)) | ((adv < 0) & (rho < 1 - lo))
    return torch.where(clipped, adv * f(rho.clamp(1 - lo, 1 + hi)), adv * f(lik.x)), clipped


@register("mask", "none")
def none(t: TokenInputs, lik: Likelihood, f: Shape) -> MaskOut:
    """J = A * f(x); no token is switched off."""
    return t.adv * f(lik.x), None


@register("mask", "clip")
def clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float) -> MaskOut:
    """J = min(A f(x), A f(clip(rho, 1 - lo, 1 + hi)))."""
    return _pessimistic(t, lik, f, lo, hi)


@register("mask", "dual_clip")
def dual_clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float, c: float) -> MaskOut:
    """J = max(J_clip, c * A) where A < 0, else J_clip  (the loss of a negative-advantage token
    never exceeds -c * A, however large its ratio)."""
    obj, clipped = _pessimistic(t, lik, f, lo, hi)
    floor = c * t.adv
    dual = (t.adv < 0) & (obj.detach() < floor)
    return torch.where(dual, floor, obj), dual if clipped is None else clipped | dual


@register("mask", "cispo")
def cispo(t: TokenInputs, lik: Likelihood, f: Shape, hi: float) -> MaskOut:
    """J = sg(min(rho, 1 + hi)) * A * log pi_theta: every token keeps a gradient, its
    importance weight is truncated and detached."""
    return lik.rho.clamp(max=1 + hi) * t.adv * t.lp, lik.rho > 1 + hi


cispo.uses_x = False  # type: ignore[attr-defined]


@register("mask", "seq_clip")
def seq_clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float) -> MaskOut:
    """as clip, with rho = s_i the length-normalised sequence ratio (whole sequences are clipped)."""
    if lik.sequence:
        return _pessimistic(t, lik, f, lo, hi)  # denom=pi_old_seq: x already has the value s_i
    return _pessimistic(t, lik, f, lo, hi, rho=t.seq_ratio().detach().expand_as(t.lp))
