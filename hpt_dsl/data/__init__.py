"""Data sources: the built-in arithmetic task, or questions from files and datasets.

    task = load_task(settings)      # Task(train, test, reward_fn)

``data.train = "arith"`` (the default) is the built-in task (``hpt_dsl.data.arith``),
generated from ``train.seed``; anything else is read by ``hpt_dsl.data.files`` and scored
by the reward ``data.reward`` names (``hpt_dsl.data.verify``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpt_dsl.data.base import Question, RewardFn
from hpt_dsl.settings import Settings

BUILTIN = "arith"


@dataclass
class Task:
    """The train questions, the held-out test questions and the reward that scores both."""

    train: list[Question]
    test: list[Question]
    reward_fn: RewardFn


def load_task(settings: Settings) -> Task:
    """The questions and reward of ``settings.data`` (see the module docstring)."""
    data = settings.data
    if data.train == BUILTIN:
        from hpt_dsl.data import arith

        train, test = arith.make_questions(settings.train.seed)
        reward_fn: RewardFn = arith.reward
    else:
        from hpt_dsl.data.files import load_questions
        from hpt_dsl.data.verify import make_reward

        train = load_questions(data.train, data, split="train")
        test = load_questions(data.test, data, split="test") if data.test else []
        reward_fn = make_reward(data)
    if data.train == BUILTIN and data.test not in (None, BUILTIN):
        from hpt_dsl.data.files import load_questions

        test = load_questions(data.test, data, split="test")
    if data.max_train:
        train = train[: data.max_train]
    if data.max_test:
        test = test[: data.max_test]
    return Task(train, test, reward_fn)
