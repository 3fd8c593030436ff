"""Regularizers added to a term's token loss, aggregated like the term itself.

KL to the frozen reference model, with d_t = log pi_ref - log pi_theta (per token):

    k1   kl = -d = log pi_theta - log pi_ref                (unbiased, high variance)
    k2   kl = d^2 / 2
    k3   kl = exp(d) - d - 1                                (unbiased, non-negative; Schulman)

and the token loss gains  + coef * kl.  The entropy bonus adds  - coef * H_t.
Tokens outside the response get d = 0 so that no padding value can overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register


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


@register("kl", "k3")
def k3(d: Tensor) -> Tensor:
    """kl = exp(d) - d - 1."""
    return torch.exp(d) - d - 1
