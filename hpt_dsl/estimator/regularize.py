"""Regularizers added to a term's token loss, aggregated like the term itself.

KL to the frozen reference model, with d_t = log pi_ref - log pi_theta (per token):

    k1   kl = -d = log pi_theta - log pi_ref                (unbiased, high variance)
    k2   kl = d^2 / 2
    k3   kl = clamp(exp(d') - d' - 1, -10, 10),  d' = clamp(d, -20, 20)
                                                            (unbiased, non-negative; Schulman;
                                                             clamped as verl's low_var_kl)

and the token loss gains  + coef * kl.  The entropy bonus adds  - coef * H_t.
Tokens outside the response get d = 0 so that no padding value can overflow.

The entropy-aware weight (SRFT) multiplies a row's objective by a constant of the forward
pass, its gradient stopped:

    exp(s, c)       w_i = c * sg(exp(s * Hbar_i))
    pos_exp(s, c)   w_i = c * sg(exp(s * Hbar_i)) where A_hat > 0, else 1

with Hbar_i = sum_t m_{i,t} H_{i,t} / |y_i| the row's mean token entropy (a row lies in one
micro-batch, so the weight does not depend on the split).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register
from hpt_dsl.recipe import Call


def log_ratio(lp: Tensor, ref: Tensor, mask: Tensor) -> Tensor:
    """d = log pi_ref - log pi_theta on response tokens, 0 elsewhere."""
    return torch.where(mask, ref - lp, 0.0)


@register("kl", "k1")
def k1(d: Tensor) -> Tensor:
    """kl = -d."""
    return -d


@register("kl", "k2")
def k2(d: Tensor) -> Tensor:
    """kl = d^2 / 2."""
    return 0.5 * d * d


K3_LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


@register("kl", "k3")
def k3(d: Tensor) -> Tensor:
    """kl = clamp(exp(d') - d' - 1, -10, 10) with d' = clamp(d, -20, 20): finite at any
    log-ratio (verl's ``low_var_kl``); outside the clamps the gradient is 0."""
    d = d.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(-K3_CLAMP, K3_CLAMP)


def entropy_weight(w: Call, entropy: Tensor, mf: Tensor, lengths: Tensor, adv: Tensor) -> Tensor:
    """The entropy-aware weight of each row (b, 1), or of each token where the advantage is
    per token (pos_exp with a (b, T) advantage); no gradient. entropy: (b, T), 0 off the
    response; mf: (b, T) float mask; lengths: (b, 1)."""
    s, c = w.args
    with torch.no_grad():
        mean_h = (entropy * mf).sum(dim=1, keepdim=True) / lengths.clamp(min=1)
        weight = c * torch.exp(s * mean_h)
        if w.name == "pos_exp":
            weight = torch.where(adv > 0, weight, 1.0)
    return weight
