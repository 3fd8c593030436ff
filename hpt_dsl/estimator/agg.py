"""Aggregations: how token losses l_{i,t} become one number. Every aggregation gives each
token of row i the same weight a_i, so that a term's loss is

    sum_i w_i * a_i * sum_t m_{i,t} * l_{i,t}           (w_i: the gate weight of row i)

The weights are computed ONCE over the whole optimizer mini-batch, from the term's active
rows only (rows its ``on`` selects and whose question has non-zero gate weight), so that
summing the loss of any split into micro-batches gives the full-batch loss exactly.

Each function receives L_i, the response length of every active row (0 for the rows the
term does not apply to), with N_tok = sum_i L_i and N_seq = #{i : L_i > 0}:

    token_mean            a_i = 1 / N_tok
    seq_mean_token_mean   a_i = 1 / (L_i * N_seq)
    seq_mean_token_sum    a_i = 1 / N_seq
    token_sum_norm(L)     a_i = 1 / (L * N_seq)          (Dr. GRPO: a constant length L)

The compiler sets a_i = 0 on inactive and empty rows, so a term with no active token
contributes exactly 0 (never NaN: every count is clamped to at least 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register


def _n_seq(length: Tensor) -> Tensor:
    return (length > 0).sum().clamp(min=1)


@register("agg", "token_mean")
def token_mean(length: Tensor) -> Tensor:
    """a_i = 1 / N_tok."""
    return torch.ones_like(length) / length.sum().clamp(min=1)


@register("agg", "seq_mean_token_mean")
def seq_mean_token_mean(length: Tensor) -> Tensor:
    """a_i = 1 / (L_i * N_seq)."""
    return 1.0 / (length.clamp(min=1) * _n_seq(length))


@register("agg", "seq_mean_token_sum")
def seq_mean_token_sum(length: Tensor) -> Tensor:
    """a_i = 1 / N_seq."""
    return torch.ones_like(length) / _n_seq(length)


@register("agg", "token_sum_norm")
def token_sum_norm(length: Tensor, L: float) -> Tensor:
    """a_i = 1 / (L * N_seq)."""
    return torch.ones_like(length) / (float(L) * _n_seq(length))
