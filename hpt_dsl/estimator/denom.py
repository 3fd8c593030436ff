"""Denominators pi_ref of the unified gradient  1_stable * (1/pi_ref) * A_hat * grad(pi_theta).

A denominator turns the log-probabilities of the taken tokens into the likelihood
quantity x whose gradient the estimator follows, and the ratio rho that masks test:

    pi_theta    x = log pi_theta               rho = 1        grad x = grad(pi_theta) / pi_theta
    pi_old      x = r = pi_theta / pi_old      rho = r        grad x = grad(pi_theta) / pi_old
    1           x = pi_theta                   rho = pi_theta grad x = grad(pi_theta)
    pi_old_seq  x = s_i                                       rho = s_i   (GSPO)
                s_i = exp( sum_t m_t (log pi_theta - log pi_old) / |y_i| ), the length-normalised
                sequence ratio, one per row: d s_i / d log pi_theta(y_t) = s_i / |y_i|.
                With per-token advantages or per-token weights (TIS) the GSPO-token form
                x = sg(s_i) * pi_theta / sg(pi_theta) is used instead (value s_i, gradient
                s_i * grad log pi_theta per token); for a per-row A_hat and uniform token
                weights the two give the same loss and the same gradient.

rho is always detached (it is only compared and clamped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register


@dataclass
class TokenInputs:
    """One micro-batch as the token-level components see it.

    lp: (b, T) log pi_theta, with gradient;  old: (b, T) log pi_old or None (0 off the
    response);  mask, mf: (b, T) response mask as bool and as floats;  adv: (b, 1) or (b, T)
    A_hat (no gradient);
    lengths: () -> (b, 1) response lengths, computed on first use;  uniform: every token of a
    row has the same weight.
    """

    lp: Tensor
    old: Tensor | None
    mask: Tensor
    mf: Tensor
    adv: Tensor
    lengths: Callable[[], Tensor]
    uniform: bool = True

    @property
    def length(self) -> Tensor:
        return self.lengths()

    def need_old(self, what: str) -> Tensor:
        if self.old is None:
            raise ValueError(f"{what} needs `old_logprobs` (log pi_old of the taken tokens, shape (B, T))")
        return self.old

    def seq_ratio(self) -> Tensor:
        """s_i = exp( sum_t m_t (lp_t - old_t) / max(|y_i|, 1) ), shape (b, 1), with gradient."""
        old = self.need_old("a sequence ratio")
        diff = ((self.lp - old) * self.mf).sum(dim=1, keepdim=True)
        return torch.exp(diff / self.length.clamp(min=1))


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
    return Likelihood(t.lp, t.lp.new_ones(()).expand_as(t.lp), x_is_rho=False)


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
    """x = rho = s_i (GSPO's length-normalised sequence ratio), (b, 1); or its token form."""
    if t.adv.shape[1] == 1 and t.uniform:
        s = t.seq_ratio()
        return Likelihood(s, s.detach(), sequence=True)
    s = t.seq_ratio().detach()
    return Likelihood(s * torch.exp(t.lp - t.lp.detach()), s.expand_as(t.lp), sequence=True)
