"""Denominators pi_ref of the unified gradient  1_stable * (1/pi_ref) * A_hat * grad(pi_theta).

A denominator turns the log-probabilities of the taken tokens into the likelihood
quantity x whose gradient the estimator follows, and the ratio rho that masks test:

    pi_theta    x = log pi_theta               rho = 1        grad x = grad(pi_theta) / pi_theta
    pi_old      x = r = pi_theta / pi_old      rho = r        grad x = grad(pi_theta) / pi_old
    1           x = pi_theta                   rho = pi_theta grad x = grad(pi_theta)
    pi_old_seq  x = sg(s_i) * pi_theta / sg(pi_theta)         rho = s_i   (GSPO)
                s_i = exp( sum_t m_t (log pi_theta - log pi_old) / |y_i| ), the length-normalised
                sequence ratio; x has the value s_i and grad x = s_i * grad log pi_theta
                (GSPO-token form, identical to GSPO's gradient when A_hat is per sequence).

rho is always detached (it is only compared and clamped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register


@dataclass
class TokenInputs:
    """One micro-batch as the token-level components see it.

    lp: (b, T) log pi_theta, with gradient;  old: (b, T) log pi_old or None;
    mask: (b, T) bool response mask;  adv: (b, 1) or (b, T) A_hat (no gradient).
    """

    lp: Tensor
    old: Tensor | None
    mask: Tensor
    adv: Tensor

    def need_old(self, what: str) -> Tensor:
        if self.old is None:
            raise ValueError(f"{what} needs `old_logprobs` (log pi_old of the taken tokens, shape (B, T))")
        return self.old

    def seq_ratio(self) -> Tensor:
        """s_i = exp( sum_t m_t (lp_t - old_t) / max(|y_i|, 1) ), shape (b, 1), with gradient."""
        old = self.need_old("a sequence ratio")
        m = self.mask
        diff = torch.where(m, self.lp - old, 0.0)
        length = m.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.exp(diff.sum(dim=1, keepdim=True) / length)


@dataclass
class Likelihood:
    """x (with gradient) and the detached ratio rho that masks test. ``x_is_rho``: x has
    rho's value (every denominator but pi_theta), so clamping x clamps the ratio;
    ``sequence``: rho is the sequence ratio s_i."""

    x: Tensor
    rho: Tensor
    x_is_rho: bool = True
    sequence: bool = False


@register("denom", "pi_theta")
def pi_theta(t: TokenInputs) -> Likelihood:
    """x = log pi_theta, rho = 1."""
    return Likelihood(t.lp, torch.ones_like(t.lp.detach()), x_is_rho=False)


@register("denom", "pi_old")
def pi_old(t: TokenInputs) -> Likelihood:
    """x = rho = exp(log pi_theta - log pi_old)."""
    r = torch.exp(t.lp - t.need_old("denom=pi_old"))
    return Likelihood(r, r.detach())


@register("denom", "1")
def one(t: TokenInputs) -> Likelihood:
    """x = rho = pi_theta = exp(log pi_theta)."""
    p = torch.exp(t.lp)
    return Likelihood(p, p.detach())


@register("denom", "pi_old_seq")
def pi_old_seq(t: TokenInputs) -> Likelihood:
    """x = sg(s_i) * exp(lp - sg(lp)), rho = s_i (GSPO's length-normalised sequence ratio)."""
    s = t.seq_ratio().detach()
    return Likelihood(s * torch.exp(t.lp - t.lp.detach()), s.expand_as(t.lp), sequence=True)
