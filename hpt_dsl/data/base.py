"""Questions and rewards: the plain values every data source produces.

A data source (the built-in arithmetic task, a JSONL / Parquet file, a hub dataset)
yields ``Question`` values; a reward function scores a response text against the
question's reference answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """One training or test question.

    id:     stable integer id (unique within its split)
    prompt: the question text, before any chat template or prompt template
    answer: the reference answer the verifier compares against
    demo:   a demonstration (a worked solution ending in the answer), or None
    """

    id: int
    prompt: str
    answer: str
    demo: str | None = None


RewardFn = Callable[[str, str], float]
"""reward(response_text, reference_answer) -> score in [0, 1] (1 = correct)."""
