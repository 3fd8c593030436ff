"""Per-question statistics that gates read, from the question's rollout rows only.

For question q with rollout rows J_q (demonstrations are not counted):

    n            = |J_q|                               (0 if the batch holds no rollout of q)
    solved       = #{j in J_q : R_j > 0.5}             (a rollout is correct when its reward > 0.5,
                                                        which fits 0/1 and -1/+1 rewards alike)
    acc          = solved / n                          (0 when n = 0)
    reward_mean  = sum_{j in J_q} R_j / n              (0 when n = 0)
    reward_std   = unbiased standard deviation of R over J_q   (0 when n < 2)
    step         = the global optimizer step (the same for every question)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpt_dsl.estimator.adv import moments

CORRECT = 0.5
"""A rollout counts as correct when its reward exceeds this."""


def question_stats(
    rewards: Tensor, group: Tensor, n_groups: int, rollout: Tensor, step: int
) -> dict[str, Tensor]:
    """(Q,) tensors: acc, solved, reward_mean, reward_std, n, step."""
    n, mean, std = moments(rewards, group, n_groups, rollout)
    zeros = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    solved = zeros.index_add(0, group, (rollout & (rewards > CORRECT)).to(rewards.dtype))
    return {
        "acc": solved / n.clamp(min=1),
        "solved": solved,
        "reward_mean": mean,
        "reward_std": std,
        "n": n,
        "step": torch.full_like(n, float(step)),
    }
