"""Evaluation: pass@k against the closed form, avg@k, and evaluate() over an engine."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import Result
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpt_dsl.data.base import Question
from hpt_dsl.data.verify import make_reward
from hpt_dsl.evaluate import evaluate, pass_at_k, report_ks, summarize
from hpt_dsl.models import build_tiny_tokenizer
from hpt_dsl.rollout.base import Rollout, RolloutEngine, SamplingParams
from hpt_dsl.settings import DataSettings


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (10, 3, 1, 0.3),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 0, 5, 0.0),
        (10, 10, 1, 1.0),
        (10, 6, 5, 1.0),  # fewer than k wrong samples: every k-subset holds a correct one
        (32, 1, 1, 1 / 32),
        (32, 1, 32, 1.0),
        (8, 2, 4, 1 - 15 / 70),  # 1 - C(6,4)/C(8,4)
    ],
)
def test_pass_at_k_known_counts(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_binomial_formula(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_report_ks() -> None:
    assert report_ks(1) == [1]
    assert report_ks(8) == [1, 2, 4, 8]
    assert report_ks(6) == [1, 2, 4, 6]
    assert report_ks(32) == [1, 2, 4, 8, 16, 32]


def test_summarize_avg_and_pass() -> None:
    rewards = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    out = summarize(rewards)
    assert out["avg@4"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@4"])  # pass@1 = avg@k for 0/1 rewards
    assert out["pass@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert out["correct"] == [1, 4, 0] and out["questions"] == 3 and out["k"] == 4


def test_summarize_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="same number"):
        summarize([[1, 0], [1]])


class ScriptedEngine(RolloutEngine):
    """Answers question i's sample j with the text script(i, j); records what it was asked."""

    def __init__(self, tokenizer: object, script: dict[int, list[str]]) -> None:
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        self.calls.append((len(prompts), params))
        out = []
        for i, prompt in enumerate(prompts):
            qid = int(self.tokenizer.decode(prompt).split("Q")[-1].split("?")[0])
            for j in range(params.n):
                ids = self.tokenizer(self.script[qid][j], add_special_tokens=False).input_ids
                out.append(Rollout(i, tuple(ids), tuple(0.0 for _ in ids), "stop" if j else "length"))
        return out

    def load_weights(self, named_tensors: Iterable) -> None:
        raise AssertionError("evaluation never loads weights")


def test_evaluate_scores_every_sample_in_order() -> None:
    tokenizer = build_tiny_tokenizer()
    questions = [Question(id=i, prompt=f"Q{i}?", answer=str(i)) for i in range(5)]
    script = {i: [rf"\boxed{{{i}}}", r"\boxed{x}", rf"so \boxed{{{i}}}"] for i in range(5)}
    script[3] = [r"\boxed{0}"] * 3  # question 3 is never solved
    engine = ScriptedEngine(tokenizer, script)
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=32, seed=7)
    out = evaluate(engine, tokenizer, questions, make_reward(DataSettings()), 3, params, batch_questions=2)
    assert out["correct"] == [2, 2, 2, 0, 2]
    assert out["avg@3"] == pytest.approx(8 / 15)
    assert out["pass@3"] == pytest.approx(4 / 5)
    assert out["pass@2"] == pytest.approx((4 * (1 - 0 / 3) + 0) / 5)  # 1 - C(1,2)/C(3,2) = 1
    assert out["truncated"] == pytest.approx(1 / 3)
    assert [c[0] for c in engine.calls] == [2, 2, 1]  # questions go in batches of 2
    assert all(p.n == 3 and p.temperature == 0.6 and p.top_p == 0.95 for _, p in engine.calls)
    assert len({p.seed for _, p in engine.calls}) == 3  # each batch draws with its own seed


# ── hpt-dsl eval on a real (tiny, built-in) checkpoint ─────────────────────────

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpt_dsl.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _eval(*args: str) -> Result:
    from hpt_dsl.cli.main import app

    return CliRunner().invoke(app, ["eval", *args])


def test_eval_command_writes_a_table_and_json(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    files = ["-d", str(DATA / "eval/gsm8k.jsonl"), "-d", str(DATA / "eval/luffy_valid_sample.parquet")]
    result = _eval(str(tiny_dir), *files, "--max-questions", "3", "--k", "2", "--max-new-tokens", "8",
                   "--reward", "boxed", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "gsm8k" in result.output and "avg@2" in result.output
    assert "no checkpoint was selected" in result.output
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == ["gsm8k", "aime", "math", "olympiad_bench", "amc", "minerva"]
    assert res["sampling"] == {"k": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8, "seed": 0,
                               "engine": "hf"}
    gsm = res["benchmarks"]["gsm8k"]
    assert gsm["questions"] == 3 and gsm["k"] == 2 and len(gsm["correct"]) == 3
    assert 0 <= gsm["avg@2"] <= gsm["pass@2"] <= 1
    assert 0 < gsm["mean_response_tokens"] <= 8
    assert res["benchmarks"]["amc"]["questions"] == 1  # the repeated AMC rows count once


def test_eval_a_run_folder_uses_its_prompt_settings(tiny_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "final-model").symlink_to(tiny_dir)
    template = "Question: {question}\nAnswer: Let's think step by step."
    settings = {"model": {"name": "tiny", "prompt_template": template}}
    (run / "run.json").write_text(json.dumps({"settings": settings}))
    result = _eval(str(run), "--data", str(DATA / "eval/aime25.jsonl"), "--max-questions", "2",
                   "--max-new-tokens", "4", "--reward", "boxed", "--json")
    assert result.exit_code == 0, result.output
    res = json.loads((run / "eval.json").read_text())  # the default output of a run folder
    assert res["checkpoint"] == str(run / "final-model")
    assert res["prompt"]["prompt_template"] == template
    assert res["benchmarks"]["aime25"]["questions"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["MODEL", "--data", "no/such/file.jsonl"], "data file no/such/file.jsonl does not exist"),
        (["./no/such/model", "--data", "DATA"], "model './no/such/model' is not a folder"),
        (["MODEL", "--data", "DATA", "--reward", "nope"], "data.reward = 'nope' is not a known reward"),
        (["MODEL", "--data", "DATA", "--answer-key", "gold"], "no column 'gold'.*prompt, answer"),
        (["MODEL", "--data", "DATA", "--dtype", "float8"], "dtype"),
    ],
)
def test_eval_bad_input_exits_2_without_traceback(tiny_dir: Path, args: list[str], message: str) -> None:
    where = {"MODEL": str(tiny_dir), "DATA": str(DATA / "eval/aime25.jsonl")}
    result = _eval(*[where.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output, re.S)
    assert "Traceback" not in result.output
