"""The built-in task: seeded arithmetic with step-by-step demonstrations.

Questions are additions, subtractions and multiplications at three levels of difficulty:

    level 1  one digit  op one digit       3+5      7-4      6*3
    level 2  two digits op one digit       47+8     52-7     23*2
    level 3  two digits op two digits      47+38    82-37    (no multiplication)

Multiplication is by 2 or 3 only. Additions are 70% of each level, subtractions 20%,
multiplications 10% (``OP_WEIGHTS``).

Every question has a demonstration that works column by column, right to left, and ends
in ``\\boxed{answer}``; carries and borrows are written into the next column::

    47+38   ->  7+8=15 / 4+3+1=8 / \\boxed{85}
    82-37   ->  12-7=5 / 7-3=4 / \\boxed{45}
    48*3    ->  8*3=24 / 4*3+2=14 / \\boxed{144}

(lines separated by newlines). Subtraction never goes below zero. The pool of distinct
questions is shuffled by the seed and split into a fixed train and test set, so test
questions are new combinations of column steps that the train set teaches.

The verifier (``reward``) extracts the last ``\\boxed{...}`` of a response and scores 1 if
it equals the reference answer as an integer, else 0.
"""

from __future__ import annotations

import random
import re

from hpt_dsl.data.base import Question

LEVEL_WEIGHTS = {1: 0.35, 2: 0.4, 3: 0.25}
"""Share of each difficulty level in the train and test sets."""
OP_WEIGHTS = {"+": 0.7, "-": 0.2, "*": 0.1}
"""Share of each operation within a level (renormalised over the operations it has).
Additions dominate: a run of a few minutes learns their column facts; subtractions
(borrows) and multiplications are the questions that keep needing demonstrations."""
MULTIPLIERS = (2, 3)
"""Multiplication is by one small digit, so its facts are few and learnable in one run."""


def demonstration(a: int, op: str, b: int) -> str:
    """The column-by-column worked solution of ``a op b``, ending in ``\\boxed{}``."""
    if op == "*":
        lines, carry = [], 0
        digits = [int(d) for d in reversed(str(a))]
        for i, d in enumerate(digits):
            total = d * b + carry
            step = f"{d}*{b}" + (f"+{carry}" if carry else "")
            lines.append(f"{step}={total}")
            carry = total // 10 if i < len(digits) - 1 else 0
        return "\n".join(lines + [f"\\boxed{{{a * b}}}"])
    da = [int(d) for d in reversed(str(a))]
    db = [int(d) for d in reversed(str(b))] + [0] * (len(str(a)) - len(str(b)))
    lines, carry = [], 0
    for i, (x, y) in enumerate(zip(da, db, strict=False)):
        last = i == len(da) - 1
        if op == "+":
            total = x + y + carry
            lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        else:
            x = x - carry
            borrow = 1 if (x < y and not last) else 0
            top = x + 10 * borrow
            lines.append(f"{top}-{y}={top - y}")
            carry = borrow
    answer = a + b if op == "+" else a - b
    return "\n".join(lines + [f"\\boxed{{{answer}}}"])


def _pool() -> list[tuple[int, int, str, int]]:
    """Every (level, a, op, b) of the task."""
    out = []
    one, two = range(10), range(10, 100)
    for a in one:
        for b in one:
            out.append((1, a, "+", b))
            if a >= b:
                out.append((1, a, "-", b))
        for b in MULTIPLIERS:
            out.append((1, a, "*", b))
    for a in two:
        for b in one:
            out.append((2, a, "+", b))
            out.append((2, a, "-", b))
        for b in MULTIPLIERS:
            out.append((2, a, "*", b))
        for b in two:
            out.append((3, a, "+", b))
            if a >= b:
                out.append((3, a, "-", b))
    return out


def make_questions(
    seed: int, n_train: int = 2000, n_test: int = 200
) -> tuple[list[Question], list[Question]]:
    """(train, test): disjoint; each (level, operation) cell gets its share
    ``LEVEL_WEIGHTS[level] * OP_WEIGHTS[op]`` (renormalised within the level) of both sets,
    the train share capped by what the cell holds after the test questions."""
    rng = random.Random(seed)
    cells: dict[tuple[int, str], list[tuple[int, int, str, int]]] = {}
    for item in _pool():
        cells.setdefault((item[0], item[2]), []).append(item)
    train: list[Question] = []
    test: list[Question] = []
    for level, level_share in LEVEL_WEIGHTS.items():
        ops = [op for (lv, op) in cells if lv == level]
        norm = sum(OP_WEIGHTS[op] for op in ops)
        for op in ops:
            items = cells[(level, op)]
            rng.shuffle(items)
            share = level_share * OP_WEIGHTS[op] / norm
            k_test = round(n_test * share)
            k_train = min(round(n_train * share), len(items) - k_test)
            test += [_question(x) for x in items[:k_test]]
            train += [_question(x) for x in items[k_test : k_test + k_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    train = [Question(i, q.prompt, q.answer, q.demo) for i, q in enumerate(train)]
    test = [Question(i, q.prompt, q.answer, q.demo) for i, q in enumerate(test)]
    return train, test


def _question(item: tuple[int, int, str, int]) -> Question:
    _, a, op, b = item
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Question(0, f"{a}{op}{b}", str(answer), demonstration(a, op, b))


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (no nesting), or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def reward(response: str, answer: str) -> float:
    """1.0 if the last ``\\boxed{}`` of ``response`` is the integer ``answer``, else 0.0."""
    got = last_boxed(response)
    if got is None:
        return 0.0
    try:
        return 1.0 if int(got) == int(answer) else 0.0
    except ValueError:
        return 0.0
