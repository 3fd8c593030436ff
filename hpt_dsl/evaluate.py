"""Evaluation: k samples per question, scored by the reward, summarised as avg@k and pass@k.

For a question with n samples of which c are correct (reward >= 0.5):

    avg@n   = mean over questions of (mean reward of its n samples)
    pass@k  = mean over questions of 1 - C(n - c, k) / C(n, k)        (k <= n)

The pass@k estimator is the unbiased one of Chen et al. (2021): the chance that at least
one of k samples drawn without replacement from the n is correct. It is computed as the
stable product ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``.

``evaluate(engine, tokenizer, questions, reward_fn, k, params)`` is what ``hpt-dsl eval``
and the training loop's periodic evaluation both call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from hpt_dsl.data.base import Question, RewardFn
from hpt_dsl.data.verify import score_batch
from hpt_dsl.rollout.base import RolloutEngine, SamplingParams

CORRECT = 0.5
"""A sample counts as correct for pass@k when its reward is at least this."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def report_ks(n: int) -> list[int]:
    """The k of pass@k to report for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def summarize(rewards: Sequence[Sequence[float]]) -> dict[str, Any]:
    """avg@n and pass@k (k in ``report_ks(n)``) from per-question rewards (n each)."""
    if not rewards:
        raise ValueError("no questions to summarise")
    n = len(rewards[0])
    if n == 0 or any(len(r) != n for r in rewards):
        raise ValueError("every question needs the same number (>= 1) of samples")
    correct = [sum(x >= CORRECT for x in r) for r in rewards]
    out: dict[str, Any] = {"questions": len(rewards), "k": n}
    out[f"avg@{n}"] = sum(sum(r) / n for r in rewards) / len(rewards)
    for k in report_ks(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rewards)
    out["correct"] = correct
    return out


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    questions: Sequence[Question],
    reward_fn: RewardFn,
    k: int,
    params: SamplingParams,
    encode: Callable[[Question], list[int]] | None = None,
    batch_questions: int = 16,
) -> dict[str, Any]:
    """Sample k responses per question, score them, summarise (see the module docstring).

    ``encode`` turns a question into prompt token ids (default: the tokenizer's chat
    template with the question as the user message). Returns ``summarize``'s dict plus
    ``mean_response_tokens``, ``truncated`` (share of samples that hit max_new_tokens),
    ``seconds``, ``tokens_per_s`` (generated tokens per second of generation) and
    ``samples_per_s`` (end to end, scoring included).
    """
    if not questions:
        raise ValueError("no questions to evaluate")
    encode = encode or (lambda q: default_encode(tokenizer, q))
    sampling = replace(params, n=k)
    rewards: list[list[float]] = []
    tokens = truncated = 0
    gen_seconds = 0.0
    start = time.perf_counter()
    for lo in range(0, len(questions), batch_questions):
        chunk = questions[lo : lo + batch_questions]
        t0 = time.perf_counter()
        rollouts = engine.generate([encode(q) for q in chunk], replace(sampling, seed=params.seed + lo))
        gen_seconds += time.perf_counter() - t0
        texts = [tokenizer.decode(list(r.token_ids), skip_special_tokens=True) for r in rollouts]
        answers = [chunk[r.prompt_index].answer for r in rollouts]
        scores = score_batch(reward_fn, texts, answers)
        rewards += [scores[i * k : (i + 1) * k] for i in range(len(chunk))]
        tokens += sum(len(r.token_ids) for r in rollouts)
        truncated += sum(r.finish_reason == "length" for r in rollouts)
    seconds = time.perf_counter() - start
    out = summarize(rewards)
    samples = len(questions) * k
    out.update(
        mean_response_tokens=tokens / samples,
        truncated=truncated / samples,
        seconds=seconds,
        tokens_per_s=tokens / gen_seconds if gen_seconds > 0 else 0.0,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
    )
    return out


def default_encode(tokenizer: Any, question: Question) -> list[int]:
    """The question as the only user message of the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
