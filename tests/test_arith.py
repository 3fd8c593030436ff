"""The built-in arithmetic task: demonstrations are correct, the split is fixed, the verifier scores 1/0."""

from __future__ import annotations

import re

import pytest

from hpt_dsl.data import arith

STEP = re.compile(r"^(\d+)([-+*])(\d+)(?:\+(\d+))?=(\d+)$")


def _check_steps(demo: str) -> None:
    """Every line but the last is a true equation ``x op y (+ carry) = total``."""
    *lines, last = demo.split("\n")
    assert last.startswith("\\boxed{") and last.endswith("}")
    for line in lines:
        m = STEP.match(line)
        assert m, line
        x, op, y, carry, total = m.groups()
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] + int(carry or 0)
        assert value == int(total), line


def test_every_demonstration_is_correct_and_ends_in_the_answer() -> None:
    train, test = arith.make_questions(0)
    for q in train + test:
        assert q.demo is not None
        _check_steps(q.demo)
        assert arith.last_boxed(q.demo) == q.answer
        assert arith.reward(q.demo, q.answer) == 1.0
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", q.prompt).groups()  # type: ignore[union-attr]
        assert int(q.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(q.answer) >= 0


@pytest.mark.parametrize(
    ("a", "op", "b", "demo"),
    [
        (47, "+", 38, "7+8=15\n4+3+1=8\n\\boxed{85}"),
        (82, "-", 37, "12-7=5\n7-3=4\n\\boxed{45}"),
        (23, "*", 3, "3*3=9\n2*3=6\n\\boxed{69}"),
        (48, "*", 3, "8*3=24\n4*3+2=14\n\\boxed{144}"),
        (3, "+", 5, "3+5=8\n\\boxed{8}"),
        (95, "+", 7, "5+7=12\n9+0+1=10\n\\boxed{102}"),
    ],
)
def test_demonstration_format(a: int, op: str, b: int, demo: str) -> None:
    assert arith.demonstration(a, op, b) == demo


def test_split_is_fixed_disjoint_and_seeded() -> None:
    train, test = arith.make_questions(0)
    again_train, again_test = arith.make_questions(0)
    assert [q.prompt for q in train] == [q.prompt for q in again_train]
    assert [q.prompt for q in test] == [q.prompt for q in again_test]
    assert not {q.prompt for q in train} & {q.prompt for q in test}
    assert len({q.prompt for q in train}) == len(train)
    assert [q.id for q in train] == list(range(len(train)))
    other_train, _ = arith.make_questions(1)
    assert [q.prompt for q in other_train] != [q.prompt for q in train]
    assert len(test) == 200


def test_test_split_has_every_level_in_its_share() -> None:
    _, test = arith.make_questions(0)

    def level(prompt: str) -> int:
        a, b = re.split(r"[-+*]", prompt)
        return 1 if len(a) == 1 else 2 if len(b) == 1 else 3

    counts = {lv: sum(level(q.prompt) == lv for q in test) for lv in (1, 2, 3)}
    for lv, share in arith.LEVEL_WEIGHTS.items():
        assert counts[lv] == round(200 * share)


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        ("7+8=15\n\\boxed{15}", "15", 1.0),
        ("\\boxed{14} no, \\boxed{15}", "15", 1.0),  # the last box counts
        ("\\boxed{15} no, \\boxed{14}", "15", 0.0),
        ("15", "15", 0.0),  # no box
        ("\\boxed{ 015 }", "15", 1.0),  # an integer compare
        ("\\boxed{x}", "15", 0.0),
        ("\\boxed{}", "15", 0.0),
        ("\\boxed{15", "15", 0.0),
    ],
)
def test_verifier(response: str, answer: str, score: float) -> None:
    assert arith.reward(response, answer) == score
