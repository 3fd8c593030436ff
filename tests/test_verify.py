"""Rewards: \\boxed{} extraction, equivalent answer forms, math-verify, custom rewards, timeouts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hpt_dsl.data.verify import (
    Reward,
    RewardError,
    boxed_reward,
    last_boxed,
    make_reward,
    math_verify_reward,
    same_answer,
    score_batch,
)
from hpt_dsl.settings import DataSettings

HANGS = r"so the answer is \boxed{9^{9^{9^{9}}}}"  # sympy evaluates this power for ever


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so $x = \boxed{5}$.", "5"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\boxed{7}}", "7"),
        (r"\boxed{ \boxed{x^{2}} }", "x^{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{12}", "12"),
        (r"the answer is $\boxed 42$", "42"),
        (r"\boxed{3} and a truncated \boxed{4", "3"),
        (r"a truncated \boxed{\frac{1}{2}", None),
        ("no box at all: 42", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


EQUIVALENT = [
    (r"\frac{1}{2}", "1/2"),  # fractions
    (r"\dfrac{1}{2}", "0.5"),
    (r"\tfrac12", r"\frac{1}{2}"),
    ("-3/4", r"-\frac{3}{4}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),  # LaTeX spacing and \left / \right
    (r"\sqrt{2}\,", r"\sqrt{2}"),
    (r"10 \text{ cm}", "10"),  # units
    (r"6.5 \mbox{ m}", "6.5"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"50\%", "50"),
    (r"\$18.00", "18"),
    (r"\text{Monday}", "Monday"),
    ("x = 5", "5"),
    ("1,000", "1000"),
    ("27.0", "27"),
    ("025", "25"),
    ("4.5e33", "4.5E33"),
]

DIFFERENT = [
    ("1/3", "0.33"),
    (r"\frac{1}{2}", r"\frac{2}{1}"),
    ("2", "3"),
    (r"\sqrt{2}", r"\sqrt{3}"),
    ("x = 5", "x = 6"),
    ("1,000", "1,001"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_same_answer_equivalent_forms(a: str, b: str) -> None:
    assert same_answer(a, b) and same_answer(b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_same_answer_different_values(a: str, b: str) -> None:
    assert not same_answer(a, b)


def test_boxed_reward_reads_the_last_box() -> None:
    assert boxed_reward(r"Half of 48 is 24, so 48 + 24 = \boxed{72}.", "72") == 1.0
    assert boxed_reward(r"I guess \boxed{70} ... no wait, \boxed{72}", "72") == 1.0
    assert boxed_reward(r"\boxed{72} is wrong, it is \boxed{70}", "72") == 0.0
    assert boxed_reward("The answer is 72.", "72") == 0.0  # no box, no reward
    assert boxed_reward(r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}") == 1.0


@pytest.mark.parametrize(
    "response,answer",
    [
        (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{(x+1)^2}", "x^2+2x+1"),
        (r"\boxed{2, 1}", "1, 2"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{10\text{ cm}}", "10"),
        (r"The answer is $\boxed{\frac{1}{2n+2}}$", r"$\frac{1}{2 n+2}$"),
    ],
)
def test_math_verify_accepts_equivalent_answers(response: str, answer: str) -> None:
    assert math_verify_reward(response, answer, timeout=5) == 1.0


@pytest.mark.parametrize("response,answer", [(r"\boxed{(x+1)^3}", "x^2+2x+1"), (r"\boxed{3}", "2")])
def test_math_verify_rejects_wrong_answers(response: str, answer: str) -> None:
    assert math_verify_reward(response, answer, timeout=5) == 0.0


def test_math_verify_timeout_kills_a_stuck_worker_and_goes_on() -> None:
    reward = Reward("math_verify", workers=1, timeout=1.5)
    try:
        scores = reward.batch([r"\boxed{0.5}", HANGS, r"\boxed{3}"], [r"\frac12", "5", "3"])
        assert scores == [1.0, 0.0, 1.0]  # the stuck answer scores 0; the next one is scored by a new worker
        assert reward.timeouts == 1
        assert reward(r"\boxed{12}", "12") == 1.0  # the pool still works afterwards
    finally:
        reward.close()


def test_pooled_scores_match_in_process_scores_in_order() -> None:
    responses = [rf"step {i}: \boxed{{{i % 3}}}" for i in range(12)]
    answers = [str(i % 2) for i in range(12)]
    pooled = make_reward(DataSettings(reward="math_verify", reward_workers=2))
    try:
        assert pooled.workers == 2
        assert pooled.batch(responses, answers) == Reward("math_verify").batch(responses, answers)
        assert pooled.batch(responses, answers) == [1.0 if i % 3 == i % 2 else 0.0 for i in range(12)]
    finally:
        pooled.close()


def test_default_workers() -> None:
    assert make_reward(DataSettings()).workers == 0  # boxed: in-process
    assert make_reward(DataSettings(reward="math_verify")).workers >= 1
    assert make_reward(DataSettings(reward="math_verify", reward_workers=0)).workers == 0


CUSTOM = '''
import time

def length_ok(response, answer):
    print("scoring", answer)  # printing must not disturb the worker protocol
    return len(response) <= int(answer)

def sleepy(response, answer):
    if response == "hang":
        time.sleep(60)
    return 1.0

def bad_type(response, answer):
    return "yes"

def broken(response, answer):
    raise KeyError("lookup")
'''


@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


@pytest.mark.parametrize("workers", [0, 2])
def test_custom_reward_by_import_path(custom_module: str, workers: int) -> None:
    reward = make_reward(DataSettings(reward=f"{custom_module}:length_ok", reward_workers=workers))
    try:
        assert reward.batch(["ab", "abcdef", "abc"], ["3", "3", "3"]) == [1.0, 0.0, 1.0]  # bools become 0/1
    finally:
        reward.close()


def test_custom_reward_timeout(custom_module: str) -> None:
    reward = Reward(f"{custom_module}:sleepy", workers=2, timeout=1.0)
    try:
        assert reward.batch(["ok", "hang", "ok", "ok"], ["", "", "", ""]) == [1.0, 0.0, 1.0, 1.0]
        assert reward.timeouts == 1
    finally:
        reward.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_custom_reward_bad_value_and_exception(custom_module: str, workers: int) -> None:
    with pytest.raises(RewardError, match=r"my_rewards:bad_type' returned 'yes'.*finite float"):
        Reward(f"{custom_module}:bad_type", workers=workers).batch(["x"], ["y"])
    with pytest.raises(RewardError, match=r"my_rewards:broken' failed: KeyError: 'lookup'"):
        Reward(f"{custom_module}:broken", workers=workers).batch(["x"], ["y"])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("exact", "not a known reward.*'boxed', 'math_verify'.*module:function"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("os.path:no_such_function", "module 'os.path' has no function 'no_such_function'"),
        (":f", "not a known reward"),
    ],
)
def test_bad_reward_specs(spec: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        make_reward(DataSettings(reward=spec))


def test_score_batch_takes_any_reward_function() -> None:
    def exact(response: str, answer: str) -> float:
        return float(response == answer)

    assert score_batch(exact, ["1", "2"], ["1", "3"]) == [1.0, 0.0]
    assert score_batch(make_reward(DataSettings()), [r"\boxed{1}", "2"], ["1", "2"]) == [1.0, 0.0]


def test_math_verify_in_process_off_the_main_thread() -> None:
    """math-verify's own timeout uses signals, which only the main thread may set: a reward
    called from another thread must still score, not fail every answer."""
    import threading

    out: list[float] = []
    reward = Reward("math_verify", workers=0, timeout=5)
    worker = threading.Thread(target=lambda: out.append(reward(r"\boxed{0.5}", "1/2")))
    worker.start()
    worker.join()
    assert out == [1.0]
