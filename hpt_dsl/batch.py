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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


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

    def select(self, rows: Tensor) -> TrainBatch:
        """The sub-batch of ``rows`` (an index tensor), with padding columns trimmed."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if value is None else value[rows]
        sub = TrainBatch(**out)
        return sub.trimmed()

    def trimmed(self) -> TrainBatch:
        """Drop prompt columns that are padding in every row, and response columns past the
        longest response: the forward pass only pays for real tokens."""
        if len(self) == 0:
            return self
        p_keep = int(self.prompt_mask.sum(1).max().item())
        t_keep = max(1, int(self.response_mask.sum(1).max().item()))
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


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) with every sequence right-aligned: ``[pad ... pad, s_0 ... s_k]``."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values, mask) with every sequence left-aligned, at least one column wide."""
    width = max(1, max((len(s) for s in seqs), default=0))
    vals = torch.full((len(seqs), width), pad, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if len(s):
            vals[i, : len(s)] = torch.as_tensor(list(s), dtype=dtype)
            mask[i, : len(s)] = 1.0
    return vals, mask
