"""TrainBatch layout and the question order of each step."""

from __future__ import annotations

import torch

from hpt_dsl.batch import build_train_batch, pad_left, pad_right
from hpt_dsl.rollout.base import Rollout
from hpt_dsl.train import step_questions


def test_rollout_rows_then_demonstration_rows_grouped_by_question() -> None:
    prompts = [[10, 11, 12], [20]]
    rollouts = [
        Rollout(0, (30, 31), (-0.5, -0.25), "length"),
        Rollout(0, (32, 2), (-1.0, -2.0), "stop"),
        Rollout(1, (33,), (-3.0,), "length"),
    ]
    batch = build_train_batch(prompts, rollouts, [1.0, 0.0, 0.5], [[40, 41, 42, 2], None], [1.0, 0.0], pad_id=0)
    assert batch.group_ids.tolist() == [0, 0, 1, 0]
    assert batch.is_demo.tolist() == [False, False, False, True]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5, 1.0]
    assert batch.prompt_ids.tolist() == [[10, 11, 12], [10, 11, 12], [0, 0, 20], [10, 11, 12]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert batch.response_ids.tolist() == [[30, 31, 0, 0], [32, 2, 0, 0], [33, 0, 0, 0], [40, 41, 42, 2]]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch.rollout_logprobs is not None
    assert batch.rollout_logprobs[1].tolist() == [-1.0, -2.0, 0.0, 0.0]
    assert batch.rollout_logprobs[3].tolist() == [0.0] * 4  # demonstrations have no engine log-probs
    assert batch.n_tokens == 3 + 3 + 1 + 3 + 2 + 2 + 1 + 4


def test_select_trims_padding_columns() -> None:
    prompts = [[10, 11, 12], [20]]
    rollouts = [Rollout(0, (30, 31, 32, 33), (0.0,) * 4, "length"), Rollout(1, (34,), (0.0,), "length")]
    batch = build_train_batch(prompts, rollouts, [0.0, 0.0], [None, None], [0.0, 0.0], pad_id=0)
    sub = batch.select(torch.tensor([1]))
    assert sub.prompt_ids.tolist() == [[20]] and sub.response_ids.tolist() == [[34]]
    assert sub.rollout_logprobs is not None and sub.rollout_logprobs.shape == (1, 1)


def test_pure_sft_batch_has_only_demonstrations() -> None:
    batch = build_train_batch([[1, 2], [3]], [], [], [[5, 2], [6, 7, 2]], [1.0, 1.0], pad_id=0)
    assert batch.is_demo.tolist() == [True, True] and batch.rollout_logprobs is None
    assert batch.group_ids.tolist() == [0, 1]


def test_padding_helpers() -> None:
    ids, mask = pad_left([[1], [2, 3], []], pad_id=9)
    assert ids.tolist() == [[9, 1], [2, 3], [9, 9]] and mask.tolist() == [[0, 1], [1, 1], [0, 0]]
    vals, vmask = pad_right([[0.5], []], pad=0.0, dtype=torch.float32)
    assert vals.tolist() == [[0.5], [0.0]] and vmask.tolist() == [[1.0], [0.0]]


def test_question_order_is_a_function_of_seed_and_step() -> None:
    n, per = 10, 4
    steps = [step_questions(n, per, s, seed=3) for s in range(5)]
    assert steps == [step_questions(n, per, s, seed=3) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10))  # the first pass visits every question once
    assert sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per pass
    assert step_questions(n, per, 0, seed=4) != steps[0]
    assert step_questions(3, 5, 0, seed=0)[:3] != [] and len(step_questions(3, 5, 0, seed=0)) == 5
