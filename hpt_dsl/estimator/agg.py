"""Aggregations: how token losses l_{i,t} become one number, as per-token weights a_{i,t}
so that a term's loss is  sum_{i,t} w_i * a_{i,t} * l_{i,t}  (w_i: the gate weight of row i).

The weights are computed ONCE over the whole optimizer mini-batch, from the term's active
rows only (rows its ``on`` selects and whose question has non-zero gate weight), so that
summing the loss of any split into micro-batches gives the full-batch loss exactly.

With m_{i,t} the response mask of active rows, L_i = sum_t m_{i,t}, N_tok = sum_{i,t} m_{i,t}
and N_seq = #{active rows with L_i > 0}:

    token_mean            a = m / N_tok
    seq_mean_token_mean   a = m / (L_i * N_seq)
    seq_mean_token_sum    a = m / N_seq
    token_sum_norm(L)     a = m / (L * N_seq)          (Dr. GRPO: a constant length L)

A term with no active token gets a = 0 everywhere: its loss is exactly 0, never NaN.
"""

from __future__ import annotations

from torch import Tensor

from hpt_dsl.estimator.registry import register


def _counts(m: Tensor) -> tuple[Tensor, Tensor]:
    length = m.sum(dim=1, keepdim=True)
    n_seq = (length > 0).sum().clamp(min=1)
    return length, n_seq


@register("agg", "token_mean")
def token_mean(m: Tensor) -> Tensor:
    """a = m / N_tok."""
    return m / m.sum().clamp(min=1)


@register("agg", "seq_mean_token_mean")
def seq_mean_token_mean(m: Tensor) -> Tensor:
    """a = m / (L_i * N_seq)."""
    length, n_seq = _counts(m)
    return m / (length.clamp(min=1) * n_seq)


@register("agg", "seq_mean_token_sum")
def seq_mean_token_sum(m: Tensor) -> Tensor:
    """a = m / N_seq."""
    return m / _counts(m)[1]


@register("agg", "token_sum_norm")
def token_sum_norm(m: Tensor, length: float) -> Tensor:
    """a = m / (L * N_seq)."""
    return m / (float(length) * _counts(m)[1])
