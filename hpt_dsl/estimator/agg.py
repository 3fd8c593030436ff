"""Aggregations: how token losses l_{i,t} become one number. Every aggregation gives each
token of row i the same weight a_i, so that a term's loss is

    sum_i w_i * a_i * sum_t m_{i,t} * l_{i,t}           (w_i: the gate weight of row i)

The weights are computed ONCE over the whole optimizer mini-batch, so that summing the
loss of any split into micro-batches gives the full-batch loss exactly.

Each function receives, for every row i, L_i its response length if the term is active on
it (0 otherwise), and the counts of the row's normaliser scope S(i):

    N_tok = sum_{j in S(i)} L_j        N_seq = #{j in S(i) : L_j > 0}

S(i) is the term's own active rows of the mini-batch by default; ``joint(...)`` widens it to
the rows of every term of the joint group (LUFFY: on- and off-policy tokens together), and
``per_question(...)`` narrows it to the rows of i's question (HPT: a loss per question,
then a mean over questions, the 1/Q applied by the compiler):

    token_mean            a_i = 1 / N_tok
    seq_mean_token_mean   a_i = 1 / (L_i * N_seq)
    seq_mean_token_sum    a_i = 1 / N_seq
    token_sum_norm(L)     a_i = 1 / (L * N_seq)          (Dr. GRPO: a constant length L)
    token_sum(L)          a_i = 1 / L                    (a token sum over a constant, no row count)

The compiler sets a_i = 0 on inactive and empty rows, so a term with no active token
contributes exactly 0 (never NaN: every count is clamped to at least 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.registry import register


@register("agg", "token_mean")
def token_mean(length: Tensor, n_tok: Tensor, n_seq: Tensor) -> Tensor:
    """a_i = 1 / N_tok."""
    return torch.ones_like(length) / n_tok.clamp(min=1)


@register("agg", "seq_mean_token_mean")
def seq_mean_token_mean(length: Tensor, n_tok: Tensor, n_seq: Tensor) -> Tensor:
    """a_i = 1 / (L_i * N_seq)."""
    return 1.0 / (length.clamp(min=1) * n_seq.clamp(min=1))


@register("agg", "seq_mean_token_sum")
def seq_mean_token_sum(length: Tensor, n_tok: Tensor, n_seq: Tensor) -> Tensor:
    """a_i = 1 / N_seq."""
    return torch.ones_like(length) / n_seq.clamp(min=1)


@register("agg", "token_sum_norm")
def token_sum_norm(length: Tensor, n_tok: Tensor, n_seq: Tensor, L: float) -> Tensor:
    """a_i = 1 / (L * N_seq)."""
    return torch.ones_like(length) / (float(L) * n_seq.clamp(min=1))


@register("agg", "token_sum")
def token_sum(length: Tensor, n_tok: Tensor, n_seq: Tensor, L: float) -> Tensor:
    """a_i = 1 / L: the sum over every active token divided by a constant (the released HPT
    and LUFFY scripts divide by the generation budget, not by a row or token count)."""
    return torch.ones_like(length) / float(L)
