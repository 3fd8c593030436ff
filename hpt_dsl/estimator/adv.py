"""Advantages A_hat: computed once per optimizer mini-batch, without gradient.

Notation: R_i is the reward of row i, g(i) its question, G_q the rows pooled into the
group of question q (its rollouts, or its rollouts and demonstrations when the estimator
says ``group=rollouts+demos``), n_q = |G_q|, mu_q and sigma_q the mean and the unbiased
standard deviation of R over G_q. A group with n_q < 2 gives every row of that question
advantage 0 (never NaN). Rows outside G_q (a demonstration when ``group=rollouts``) are
compared against the same group statistics.

Each function returns (B,) per-row advantages, or (B, T) per-token ones (gae).

Advantages standardised over a batch (batch_norm, token_whiten, and gae unless its whitening
is switched off) take their moments over the whole step, as the reference implementations
do (verl whitens the step's whole rollout batch): a function with a ``moments`` attribute
reads ``inp.moments`` when the loop passes the step's, and computes them from the batch at
hand otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register

EPS = 1e-6
"""epsilon added to standard deviations (group_norm, batch_norm)."""
WHITEN_EPS = 1e-8
"""epsilon added to the variance when whitening token advantages (verl's masked_whiten)."""


@dataclass(frozen=True)
class AdvInputs:
    """What an advantage may read (all for the whole mini-batch, no gradient).

    rewards: (B,) R_i;  group: (B,) dense question index in [0, n_groups);
    pooled: (B,) bool, rows in G_q;  active: (B,) bool, rows the term is applied to
    (selected by ``on`` and with non-zero gate weight);  response_mask: (B, T);
    values: (B, T) critic values or None;  moments: (2,) [mu, d] the step's whitening moments
    (A = (x - mu) / d) for the advantages standardised over the step, or None.
    """

    rewards: Tensor
    group: Tensor
    n_groups: int
    pooled: Tensor
    active: Tensor
    response_mask: Tensor
    values: Tensor | None = None
    moments: Tensor | None = None


def moments(x: Tensor, group: Tensor, n_groups: int, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-question (n_q, mu_q, sigma_q) of x over the rows with weight 1, by vectorised scatter:

    n_q = sum_j w_j,  mu_q = sum_j w_j x_j / n_q,  sigma_q = sqrt(sum_j w_j (x_j - mu_q)^2 / (n_q - 1)).
    Empty questions get mu = 0; questions with n_q < 2 get sigma = 0.
    """
    w = weight.to(x.dtype)
    zeros = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    n = zeros.index_add(0, group, w)
    mu = zeros.index_add(0, group, w * x) / n.clamp(min=1)
    dev = (x - mu[group]) ** 2 * w
    var = zeros.index_add(0, group, dev) / (n - 1).clamp(min=1)
    return n, mu, var.sqrt()


def group_stats(inp: AdvInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(n_q, mu_q, sigma_q) of each row's question over the pooled rows G_q, shape (B,) each."""
    n, mu, sigma = moments(inp.rewards, inp.group, inp.n_groups, inp.pooled)
    return n[inp.group], mu[inp.group], sigma[inp.group]


@register("adv", "const")
def const(inp: AdvInputs, c: float) -> Tensor:
    """A_hat_i = c (SFT uses c = 1)."""
    return torch.full_like(inp.rewards, float(c))


@register("adv", "reward")
def reward(inp: AdvInputs) -> Tensor:
    """A_hat_i = R_i (REINFORCE)."""
    return inp.rewards.clone()


@register("adv", "group_norm")
def group_norm(inp: AdvInputs) -> Tensor:
    """A_hat_i = (R_i - mu_q) / (sigma_q + eps), q = g(i)  (GRPO; unbiased sigma, eps = 1e-6)."""
    n, mu, sigma = group_stats(inp)
    return torch.where(n >= 2, (inp.rewards - mu) / (sigma + EPS), 0.0)


@register("adv", "group_mean")
def group_mean(inp: AdvInputs) -> Tensor:
    """A_hat_i = R_i - mu_q  (Dr. GRPO: no division by the standard deviation)."""
    n, mu, _ = group_stats(inp)
    return torch.where(n >= 2, inp.rewards - mu, 0.0)


@register("adv", "pm_one")
def pm_one(inp: AdvInputs) -> Tensor:
    """A_hat_i = +1 if R_i > 0.5 (a correct response) else -1: SRFT's reward of +-1."""
    return torch.where(inp.rewards > 0.5, 1.0, -1.0).to(inp.rewards.dtype)


@register("adv", "rloo")
def rloo(inp: AdvInputs) -> Tensor:
    """A_hat_i = R_i - (S_q - R_i) / (n_q - 1) for i in G_q (leave-one-out mean of the others),
    and R_i - S_q / n_q for a row outside G_q;  S_q = sum_{j in G_q} R_j."""
    n, mu, _ = group_stats(inp)
    s = mu * n
    inside = inp.rewards - (s - inp.rewards) / (n - 1).clamp(min=1)
    adv = torch.where(inp.pooled, inside, inp.rewards - mu)
    return torch.where(n >= 2, adv, 0.0)


def _batch_norm_moments(inp: AdvInputs) -> Tensor:
    """[mu_B, sigma_B + eps] of R over the pooled rows the term is active on (unbiased sigma);
    [0, inf] with fewer than 2 such rows (every advantage 0)."""
    w = (inp.pooled & inp.active).to(inp.rewards.dtype)
    n = w.sum()
    mu = (w * inp.rewards).sum() / n.clamp(min=1)
    sigma = ((inp.rewards - mu) ** 2 * w).sum().div((n - 1).clamp(min=1)).sqrt()
    return torch.where(n >= 2, torch.stack([mu, sigma + EPS]), torch.stack([mu * 0, mu * 0 + torch.inf]))


@register("adv", "batch_norm")
def batch_norm(inp: AdvInputs) -> Tensor:
    """A_hat_i = (R_i - mu_B) / (sigma_B + eps) over the rows B of the step that are pooled and
    that the term is active on (unbiased sigma). Fewer than 2 such rows: 0."""
    m = inp.moments if inp.moments is not None else _batch_norm_moments(inp)
    return (inp.rewards - m[0]) / m[1]


batch_norm.moments = lambda inp: _batch_norm_moments(inp)  # type: ignore[attr-defined]


def token_moments(x: Tensor, mask: Tensor) -> Tensor:
    """[mu, sqrt(var + 1e-8)] of x over the tokens where mask holds, var unbiased (verl's
    masked_whiten); [0, inf] with fewer than 2 tokens."""
    m = mask.to(x.dtype)
    n = m.sum()
    mu = (x * m).sum() / n.clamp(min=1)
    var = (((x - mu) ** 2) * m).sum() / (n - 1).clamp(min=1)
    return torch.where(n >= 2, torch.stack([mu, (var + WHITEN_EPS).sqrt()]), torch.stack([mu * 0, mu * 0 + torch.inf]))


def _token_whiten_moments(inp: AdvInputs) -> Tensor:
    rows = (inp.pooled & inp.active)[:, None] & inp.response_mask.bool()
    return token_moments(inp.rewards[:, None].expand(rows.shape), rows)


@register("adv", "token_whiten")
def token_whiten(inp: AdvInputs) -> Tensor:
    """A_hat_i = (G_i - mu) / sqrt(var + 1e-8): the token returns with gamma = 1 (G_{i,t} = R_i
    on every response token, the reward being on the last one) whitened over every response
    token of the step's active rows, var unbiased (REINFORCE++ as verl computes it). A row's
    tokens share one value, so the mean and variance weigh each row by its length."""
    m = inp.moments if inp.moments is not None else _token_whiten_moments(inp)
    return (inp.rewards - m[0]) / m[1]


token_whiten.moments = lambda inp: _token_whiten_moments(inp)  # type: ignore[attr-defined]


def gae_whitens(args: tuple[float, ...]) -> bool:
    """gae(gamma, lambda) whitens; gae(gamma, lambda, 0) does not."""
    return len(args) < 3 or args[2] != 0


def whiten_tokens(adv: Tensor, mask: Tensor, moments: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A - mu) / sqrt(var + 1e-8) over the tokens where mask holds, 0 elsewhere, and the
    moments used ([mu, sqrt(var + 1e-8)], from ``moments`` when given)."""
    m = moments if moments is not None else token_moments(adv, mask)
    return torch.where(mask, (adv - m[0]) / m[1], 0.0), m


def token_rewards(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """r_t: the sequence reward on the last response token of each row, 0 elsewhere."""
    m = response_mask.to(rewards.dtype)
    t = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m > 0, t, -1).amax(dim=1)
    r = torch.zeros_like(m)
    has = last >= 0
    r[has, last[has]] = rewards[has]
    return r


def gae_returns(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (padding is skipped):

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},
        returns_t = A_t + V_t,   with V and A after the last response token = 0.

    A loop over T (not over rows), vectorised across the batch.
    """
    m = response_mask.to(values.dtype) > 0
    r = token_rewards(rewards.to(values.dtype), response_mask)
    v = torch.where(m, values, 0.0)
    adv = torch.zeros_like(v)
    next_v = torch.zeros_like(v[:, 0])
    last = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * last
        adv[:, t] = torch.where(mt, a, 0.0)
        next_v = torch.where(mt, v[:, t], next_v)
        last = torch.where(mt, a, last)
    return adv, adv + v


@register("adv", "gae")
def gae(inp: AdvInputs, gamma: float, lam: float, whiten: float = 1.0) -> Tensor:
    """A_hat_t = GAE(gamma, lambda) over the critic's values (see ``gae_returns``), whitened
    over the active response tokens of the step (``whiten_tokens``) unless whiten = 0; (B, T)."""
    if inp.values is None:
        raise ValueError("adv=gae needs `values` (the critic's values of the response tokens, shape (B, T))")
    adv = gae_returns(inp.rewards, inp.values, inp.response_mask, gamma, lam)[0]
    if not gae_whitens((gamma, lam, whiten)):
        return adv
    return whiten_tokens(adv, inp.response_mask.bool() & inp.active[:, None], inp.moments)[0]
