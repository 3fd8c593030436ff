"""Shared prompts: the forward pass runs each distinct prompt of a micro-batch once.

In a GRPO-style batch the n responses to a question (and its demonstration) share one
prompt. The plain forward runs the model over ``prompt + response`` for every row and so
computes the prompt's keys and values n times. Here, for a micro-batch of B rows with u
distinct prompts (left-padded to width P) and responses of width T:

    1. prompt pass:   model(U)  over the u distinct prompts, with a KV cache
                      -> K_U, V_U per layer, and the logits of each prompt's last position
    2. repeat:        K[b] = K_U[owner(b)],  V[b] = V_U[owner(b)]   (an index, differentiable)
    3. response pass: model(responses, cache=(K, V),
                            attention_mask = [prompt_mask | response_mask],
                            position_ids   = the plain forward's positions of the response)

    logits of response token t = prompt pass's last logits      for t = 0
                                 response pass's position t - 1  for t >= 1

Causal attention makes this the plain forward's function exactly: a prompt position only
attends to prompt positions, so its keys and values do not depend on the response. The
gradient is the plain one too: autograd sums, through the index of step 2, the gradients
of every row that reads a prompt's keys and values. The prompt costs u / B of the plain
forward's prompt work (1/n in a GRPO micro-batch).

It needs a model whose cache is a ``DynamicCache`` of plain full-attention layers
(``DynamicLayer``); for any other (sliding-window, hybrid or recurrent layers) and when
every row has its own prompt, the caller runs the plain forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hpt_dsl.batch import TrainBatch, model_inputs, positions
from hpt_dsl.learner.head import FusedHead, run
from hpt_dsl.models import plain_cache


def distinct_prompts(mb: TrainBatch) -> tuple[Tensor, Tensor] | None:
    """(rows of ``mb`` holding each distinct prompt, owner index of every row), on ``mb``'s
    device, or None when no two rows share a prompt. A prompt is its ids and mask over the
    micro-batch's width. The learner passes the host copy of a micro-batch (no device sync)."""
    key = torch.cat([mb.prompt_ids, mb.prompt_mask], dim=1)
    uniq, owner = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == key.shape[0]:
        return None
    first = torch.full((uniq.shape[0],), key.shape[0], dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, owner, torch.arange(key.shape[0], device=key.device), reduce="amin")
    return first, owner


def shared_prompt_logits(
    model: Any, mb: TrainBatch, device: torch.device, rows: Tensor, owner: Tensor, head: FusedHead | None = None
) -> tuple[Tensor, Tensor] | None:
    """(first, rest): the logits of response token 0, (B, 1, V), and of tokens 1..T-1,
    (B, T-1, V), computed with each distinct prompt (``rows``) run once and its cache shared
    by the rows that ``owner`` maps to it; with ``head`` (the fused path) the last hidden
    states there instead, (B, 1, H) and (B, T-1, H). None when the model's cache is not plain."""
    P, T = mb.prompt_ids.shape[1], mb.response_ids.shape[1]
    rows = rows.to(mb.prompt_ids.device)
    p_ids, p_mask = mb.prompt_ids[rows].to(device), mb.prompt_mask[rows].to(device)
    last, out = run(model, head, 1, input_ids=p_ids, attention_mask=p_mask, position_ids=positions(p_mask),
                    use_cache=True)  # fmt: skip
    cache = out.past_key_values
    if not plain_cache(cache):
        return None
    owner = owner.to(device)
    cache.batch_select_indices(owner)
    _, mask, pos = model_inputs(mb, device)
    pos = pos[:, P:]
    first = last[:, -1:][owner]
    if T == 1:
        return first, first[:, :0]
    rest, _ = run(
        model,
        head,
        T - 1,
        input_ids=mb.response_ids[:, : T - 1].to(device),
        attention_mask=mask[:, : P + T - 1],
        position_ids=pos[:, : T - 1],
        past_key_values=cache,
        use_cache=True,
    )
    return first, rest
