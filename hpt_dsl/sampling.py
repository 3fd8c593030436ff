"""DAPO's dynamic sampling and overlong reward shaping (Yu et al. 2025), as run settings.

Overlong reward shaping (``rollout.overlong_cache`` = L_cache > 0). With the generation
budget L_max = ``rollout.max_new_tokens``, a rollout of |y| tokens (its end-of-sequence
token included) gets, added to the verifier's score,

    R_len(y) = 0                                   if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                                  if |y| > L_max

times ``rollout.overlong_penalty`` (1 by default). The penalty falls linearly from 0 to -1
over the last L_cache tokens of the budget; a response cut at the budget gets -1.

Dynamic sampling (``rollout.dynamic_sampling``). A group (a question's rollouts) whose
verifier scores all agree (accuracy 0 or 1 for 0/1 rewards) has zero variance: its
group-relative advantages are 0 and it only dilutes the token normaliser. Each round
generates rollouts for a round of questions and keeps the informative groups, until the
step holds ``train.questions`` of them or ``rollout.max_sampling_rounds`` rounds have run:

    round 0:  the step's own questions (``step_questions``: the run without dynamic sampling)
    round r:  train.questions questions of a permutation seeded by (seed, step, r), the
              questions of the step's earlier rounds left out while others remain

Every process samples its block (``dist.shard``) of each round's questions and fills its
own share of the step, so the questions of a round, and each process's share, are a
function of (seed, step, round) and a resume needs no state; the next step's questions are
those it has without dynamic sampling. A round is one sampling call on every process (a
ZeRO-3 model's forward passes are collective): the rounds go on while any process's share
is short, and a process whose share is full joins them without questions. The informative
groups are kept in the order they were drawn; the surplus of the last round is dropped (as
verl does). When the rounds run out first, the step trains on the informative groups it
found: the rest of its places are taken by zero-variance groups that are kept out of the
loss and of every normaliser (their response masks are 0), and ``sampling/short`` counts
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hpt_dsl.rollout.base import Rollout

CORRECT = 0.5
"""A rollout counts as correct in ``sampling/acc`` when its score is at least this (as ``acc``)."""


def overlong_penalty(length: int, max_new_tokens: int, cache: int, factor: float = 1.0) -> float:
    """``factor * R_len`` of a response of ``length`` tokens (module docstring); 0 when
    ``cache`` is 0 (shaping off)."""
    if cache <= 0:
        return 0.0
    expected = max_new_tokens - cache
    if length <= expected:
        return 0.0
    if length > max_new_tokens:
        return -1.0 * factor
    return factor * (expected - length) / cache


def zero_variance(scores: Sequence[float]) -> bool:
    """True when every score of a group is the same (fewer than 2 scores included)."""
    return len(scores) < 2 or max(scores) == min(scores)


def round_questions(first: list[int], n_train: int, step: int, seed: int, round_: int) -> list[int]:
    """The train question indices of sampling round ``round_`` of ``step`` (``first`` is
    round 0's), as many as ``first``: a permutation seeded by (seed, step, round), the
    questions of earlier rounds last (taken only when too few others remain)."""
    out, seen = list(first), set(first)
    for r in range(1, round_ + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 7_919 + r + 15_485_863)
        perm = torch.randperm(n_train, generator=g).tolist()
        order = [i for i in perm if i not in seen] + [i for i in perm if i in seen]
        out = [order[k % n_train] for k in range(len(first))]
        seen.update(out)
    return out


@dataclass
class Group:
    """One question of a round, its rollouts (``prompt_index`` as generated) and their
    verifier scores."""

    question: Any
    rollouts: list[Rollout]
    scores: list[float]

    @property
    def informative(self) -> bool:
        return not zero_variance(self.scores)


def groups_of(questions: Sequence[Any], rollouts: Sequence[Rollout], scores: Sequence[float]) -> list[Group]:
    """The rollouts and scores of one generate call, grouped by question."""
    groups = [Group(q, [], []) for q in questions]
    for r, s in zip(rollouts, scores, strict=True):
        groups[r.prompt_index].rollouts.append(r)
        groups[r.prompt_index].scores.append(s)
    return groups


@dataclass
class Filled:
    """This process's share of a step: ``groups[:trained]`` are informative and trained on,
    the rest (only when the rounds ran out) are zero-variance groups kept out of the loss."""

    groups: list[Group]
    trained: int
    rounds: int
    drawn: int
    dropped: int
    surplus: int
    drawn_rollouts: int
    drawn_correct: int

    @property
    def short(self) -> int:
        return len(self.groups) - self.trained


def fill_share(
    draw: Callable[[int, bool], list[Group]],
    share: int,
    max_rounds: int,
    anyone: Callable[[bool], bool] = lambda need: need,
) -> Filled:
    """Run rounds 0, 1, ... while some process (``anyone(this process needs more)``) still has
    fewer than its ``share`` of informative groups, at most ``max_rounds``: ``draw(round,
    need)`` samples this process's questions of the round when ``need``, and otherwise joins
    the round's sampling call without questions (returning no group). Keep the first ``share``
    informative groups, in order, and complete a short share with zero-variance groups in the
    order they were drawn."""
    keep: list[Group] = []
    zero: list[Group] = []
    rounds = drawn = rollouts = correct = 0
    while rounds < max_rounds and anyone(len(keep) < share):
        groups = draw(rounds, len(keep) < share)
        rounds += 1
        drawn += len(groups)
        for g in groups:
            (keep if g.informative else zero).append(g)
            rollouts += len(g.scores)
            correct += sum(x >= CORRECT for x in g.scores)
    surplus = max(0, len(keep) - share)
    keep = keep[:share]
    fill = zero[: share - len(keep)]
    return Filled(keep + fill, len(keep), rounds, drawn, len(zero), surplus, rollouts, correct)


def flatten(groups: Sequence[Group]) -> tuple[list[Any], list[Rollout], list[float]]:
    """(questions, rollouts, scores) of ``groups``, each rollout's ``prompt_index`` set to its
    group's place in ``groups``."""
    questions, rollouts, scores = [], [], []
    for i, g in enumerate(groups):
        questions.append(g.question)
        rollouts += [Rollout(i, r.token_ids, r.logprobs, r.finish_reason) for r in g.rollouts]
        scores += g.scores
    return questions, rollouts, scores
