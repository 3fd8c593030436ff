"""Stabilisation masks 1_stable: which tokens keep their gradient.

Each mask returns the per-token loss l_t (to be minimised) and the boolean tensor of
tokens it switched off (for the clip fraction), from the advantage A = A_hat, the
likelihood quantity x, its ratio rho (see denom.py) and the shaping f (see grad.py):

    none              l = -A * f(x)
    clip(lo, hi)      l = -min(A * f(x), A * f(clip(rho, 1 - lo, 1 + hi)))          (PPO)
                        i.e. zero gradient exactly where A > 0 and rho > 1 + hi, or A < 0 and rho < 1 - lo
    dual_clip(lo,hi,c) as clip, and for A < 0 the loss is capped at -c * A (zero gradient there)
    cispo(hi)         l = -sg(min(rho, 1 + hi)) * A * log pi_theta                   (CISPO)
    seq_clip(lo, hi)  as clip, with rho replaced by the sequence ratio s_i             (GSPO)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.denom import Likelihood, TokenInputs
from hpt_dsl.estimator.grad import Shape
from hpt_dsl.estimator.registry import register

MaskOut = tuple[Tensor, "Tensor | None"]


def _pessimistic(adv: Tensor, fx: Tensor, rho: Tensor, f: Shape, lo: float, hi: float) -> MaskOut:
    """-min(A f(x), A f(clip(rho))) written as a selection, so clipped tokens carry exactly 0 gradient."""
    clipped = ((adv > 0) & (rho > 1 + hi)) | ((adv < 0) & (rho < 1 - lo))
    capped = adv * f(rho.clamp(1 - lo, 1 + hi))
    return -torch.where(clipped, capped, adv * fx), clipped


@register("mask", "none")
def none(t: TokenInputs, lik: Likelihood, f: Shape) -> MaskOut:
    """l = -A * f(x); no token is switched off."""
    return -(t.adv * f(lik.x)), None


@register("mask", "clip")
def clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float) -> MaskOut:
    """l = -min(A f(x), A f(clip(rho, 1 - lo, 1 + hi)))."""
    return _pessimistic(t.adv, f(lik.x), lik.rho, f, lo, hi)


@register("mask", "dual_clip")
def dual_clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float, c: float) -> MaskOut:
    """l = min(l_clip, -c * A) where A < 0, else l_clip  (the loss of a negative-advantage token
    never exceeds -c * A, however large its ratio)."""
    loss, clipped = _pessimistic(t.adv, f(lik.x), lik.rho, f, lo, hi)
    bound = -c * t.adv
    dual = (t.adv < 0) & (loss.detach() > bound)
    return torch.where(dual, bound, loss), clipped | dual


@register("mask", "cispo")
def cispo(t: TokenInputs, lik: Likelihood, f: Shape, hi: float) -> MaskOut:
    """l = -sg(min(rho, 1 + hi)) * A * log pi_theta: every token keeps a gradient, its
    importance weight is truncated and detached."""
    return -(lik.rho.clamp(max=1 + hi) * t.adv * t.lp), lik.rho > 1 + hi


@register("mask", "seq_clip")
def seq_clip(t: TokenInputs, lik: Likelihood, f: Shape, lo: float, hi: float) -> MaskOut:
    """as clip, with rho = s_i the length-normalised sequence ratio (whole sequences are clipped)."""
    s = t.seq_ratio().detach().expand_as(t.lp)
    return _pessimistic(t.adv, f(lik.x), s, f, lo, hi)
