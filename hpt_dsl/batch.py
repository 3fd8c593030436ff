"""TrainBatch: the rows one optimizer step learns from, as padded tensors.

A row is a prompt and one response to it: a rollout sampled by the policy, or the
question's demonstration (``is_demo``). Layout, the same as generation's::

    prompt_ids   (B, P)  left-padded   prompt_mask   (B, P)  1 on real prompt tokens
    response_ids (B, T)  right-padded  response_mask (B, T)  1 on real response tokens

so that the response of every row starts at column P, and the learner reads the
log-probs of response token t from the logits at column P - 1 + t.

Per row: ``group_ids`` (the question's index in the step, the advantage group),
``is_demo``, ``rewards`` (the verifier's score, demonstrations included), and where the
engine reported them ``rollout_logprobs`` (B, T) (zeros on demonstration rows).
A row kept out of the loss (``exclude``) has a response mask of 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # the batch is a neutral type: it imports neither the engines nor the loop
    from hpt_dsl.rollout.base import Rollout


@dataclass
class TrainBatch:
    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    group_ids: Tensor
    is_demo: Tensor
    rewards: Tensor
    rollout_logprobs: Tensor | None = None

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) prompt + response tokens."""
        return int(self.prompt_mask.sum().item() + self.response_mask.sum().item())

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with every tensor on ``device``."""
        return TrainBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def exclude(self, rows: Tensor) -> TrainBatch:
        """The batch with the rows where ``rows`` (a (B,) bool tensor) is True kept out of the
        loss: their response masks are 0, so every aggregation gives them weight 0 and no
        normaliser counts them (L_i = 0), while their rewards still count in their question's
        group statistics. A truncated response under ``rollout.mask_truncated``."""
        keep = (~rows.to(self.response_mask.device)).to(self.response_mask.dtype)
        return replace(self, response_mask=self.response_mask * keep[:, None])

    def select(self, rows: Tensor, like: TrainBatch | None = None) -> TrainBatch:
        """The sub-batch of ``rows`` (an index tensor), with padding columns trimmed. ``like``:
        the same rows of a host (CPU) copy of this batch, already selected, whose widths are
        taken instead of reading the masks back from the device (no synchronisation)."""
        out = {}
        on: dict[torch.device, Tensor] = {}  # the index, moved once per device
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.device not in on:
                on[value.device] = rows.to(value.device)
            out[f.name] = None if value is None else value[on[value.device]]
        sub = TrainBatch(**out)
        if like is None:
            return sub.trimmed()
        return sub.trimmed((like.prompt_ids.shape[1], like.response_ids.shape[1]))

    def trimmed(self, widths: tuple[int, int] | None = None) -> TrainBatch:
        """Drop prompt columns that are padding in every row, and response columns past the
        longest response: the forward pass only pays for real tokens. ``widths``: the (prompt,
        response) widths to keep, when known on the host."""
        if len(self) == 0:
            return self
        if widths is None:
            p_keep = int(self.prompt_mask.sum(1).max().item())
            t_keep = max(1, int(self.response_mask.sum(1).max().item()))
        else:
            p_keep, t_keep = widths
        P = self.prompt_ids.shape[1]
        rl = self.rollout_logprobs
        return replace(
            self,
            prompt_ids=self.prompt_ids[:, P - p_keep :],
            prompt_mask=self.prompt_mask[:, P - p_keep :],
            response_ids=self.response_ids[:, :t_keep],
            response_mask=self.response_mask[:, :t_keep],
            rollout_logprobs=None if rl is None else rl[:, :t_keep],
        )


def positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: 0, 1, ... on the real tokens (padding gets 0, and a
    right-padding column repeats the last real position)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def model_inputs(mb: TrainBatch, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, position_ids) of the rows' prompt + response."""
    ids = torch.cat([mb.prompt_ids, mb.response_ids], dim=1).to(device)
    mask = torch.cat([mb.prompt_mask, (mb.response_mask > 0).long()], dim=1).to(device)
    return ids, mask, positions(mask)


def _to(x: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if x is None else x.to(device)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) with every sequence right-aligned: ``[pad ... pad, s_0 ... s_k]``, on the
    CPU (the caller moves them once)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long, device="cpu")
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values, mask) with every sequence left-aligned, at least one column wide."""
    width = max(1, max((len(s) for s in seqs), default=0))
    vals = torch.full((len(seqs), width), pad, dtype=dtype, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.float32, device="cpu")
    for i, s in enumerate(seqs):
        if len(s):
            vals[i, : len(s)] = torch.as_tensor(list(s), dtype=dtype, device="cpu")
            mask[i, : len(s)] = 1.0
    return vals, mask


def build_train_batch(
    prompts: Sequence[Sequence[int]],
    rollouts: Sequence[Rollout],
    rollout_rewards: Sequence[float],
    demos: Sequence[Sequence[int] | None],
    demo_rewards: Sequence[float],
    pad_id: int,
) -> TrainBatch:
    """One row per rollout, then one per demonstration, grouped by question index.

    ``prompts[i]`` and ``demos[i]`` belong to question i (``demos[i]`` None when it has no
    demonstration); ``rollouts[j].prompt_index`` says whose rollout j is.
    """
    p_rows: list[Sequence[int]] = []
    r_rows: list[Sequence[int]] = []
    lp_rows: list[Sequence[float]] = []
    group: list[int] = []
    demo_flag: list[bool] = []
    rewards: list[float] = []
    for r, reward in zip(rollouts, rollout_rewards, strict=True):
        p_rows.append(prompts[r.prompt_index])
        r_rows.append(r.token_ids)
        lp_rows.append(r.logprobs)
        group.append(r.prompt_index)
        demo_flag.append(False)
        rewards.append(reward)
    for i, (demo, reward) in enumerate(zip(demos, demo_rewards, strict=True)):
        if demo is None:
            continue
        p_rows.append(prompts[i])
        r_rows.append(demo)
        lp_rows.append([0.0] * len(demo))
        group.append(i)
        demo_flag.append(True)
        rewards.append(reward)
    prompt_ids, prompt_mask = pad_left(p_rows, pad_id)
    response_ids, response_mask = pad_right(r_rows, pad_id, torch.long)
    rollout_lp, _ = pad_right(lp_rows, 0.0, torch.float32)
    return TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        group_ids=torch.tensor(group, dtype=torch.long, device="cpu"),
        is_demo=torch.tensor(demo_flag, dtype=torch.bool, device="cpu"),
        rewards=torch.tensor(rewards, dtype=torch.float32, device="cpu"),
        rollout_logprobs=rollout_lp if rollouts else None,
    )


def used_rows(prep: Any) -> Tensor:
    """Indices of the rows the prepared loss gives any weight: a row whose every term
    coefficient is 0 (a gated-out question's rollouts, an unused demonstration) and that
    trains no critic contributes nothing, and its forward pass is skipped."""
    used = torch.zeros(prep.batch_size, dtype=torch.bool, device=prep.response_mask.device)
    for c in prep.coef:
        used |= c != 0
    if prep.value_coef is not None:
        used |= prep.value_coef != 0
    return torch.nonzero(used, as_tuple=False).squeeze(1).cpu()
