"""End to end on a real pretrained model: HPT on SmolLM2-135M with real math data, then eval.

Small on purpose (2 questions a step, 2 rollouts each, short responses) so that it runs on a
2-core CPU; what it checks is that every piece is real and the numbers are sane.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from hpt_dsl import hub
from hpt_dsl.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_hpt.hpt"
SMALL = [
    f"data.train={ROOT / 'data/train/gsm8k_train.jsonl'}",
    f"data.test={ROOT / 'data/eval/gsm8k.jsonl'}",
    "data.max_test=2",
    "train.steps=2",
    "train.questions=2",
    "train.micro_batch=4",
    "train.eval_every=0",
    "rollout.n=2",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=16",
]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return hub.resolve("smollm2-135m")  # converts the GGUF file once (cached afterwards)


@pytest.mark.slow
def test_hpt_on_smollm2_with_real_math_then_eval(smollm2: str, tmp_path: Path) -> None:
    from hpt_dsl.cli.main import app
    from typer.testing import CliRunner

    from hpt_dsl.train import run_recipe

    result = run_recipe(RECIPE, overrides=SMALL, output=tmp_path / "run", quiet=True)
    lines = _lines(result.run_dir)
    steps = [r for r in lines if r["kind"] == "train"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in steps:
        assert not r["skipped"] and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        # the gate splits the questions: every question takes exactly one branch
        assert r["gate/sft"] + r["gate/grpo"] == pytest.approx(1.0)
        assert r["gate/grpo"] > 0 if r["acc"] > 0 else r["gate/sft"] == 1.0
        # SFT loss = mean NLL per demonstration token of a *pretrained* model on real solutions:
        # far below a uniform guess over the vocabulary (ln 49152 = 10.8 nats)
        if r["gate/sft"] > 0:
            assert 0.2 < r["loss/sft"] < 4.0, r["loss/sft"]
        assert r["demos"] == 2 and 0.0 <= r["acc"] <= 1.0
    assert all(e["eval/questions"] == 2 and 0 <= e["eval/avg@1"] <= 1 for e in evals)
    assert (result.run_dir / "final-model" / "model.safetensors").is_file()

    # the trained model, evaluated on a few real benchmark questions
    out = tmp_path / "eval.json"
    files = ["-d", str(ROOT / "data/eval/math500.jsonl"), "-d", str(ROOT / "data/eval/aime25.jsonl")]
    cli = CliRunner().invoke(app, ["eval", str(result.run_dir), *files, "--max-questions", "2", "--k", "2",
                                   "--max-new-tokens", "16", "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(result.run_dir / "final-model")
    assert res["prompt"]["system_prompt"].startswith("Please reason step by step")  # the run's own prompt
    for name in ("math500", "aime25"):
        b = res["benchmarks"][name]
        assert b["questions"] == 2 and b["k"] == 2 and 0 <= b["avg@2"] <= b["pass@2"] <= 1
        assert b["tokens_per_s"] > 0


CUSTOM = '''
def even_answer(response, answer):
    """1.0 for every rollout of a question whose reference answer is even, else 0.0."""
    return float(int(answer) % 2 == 0)
'''


@pytest.mark.slow
def test_custom_reward_and_the_gate_route_each_question(
    smollm2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom reward through the whole loop, with pass rates known in advance: questions
    with an even answer are always solved (RL branch, zero group advantage), the others never
    (SFT branch), so the gate's split must equal the share of even answers."""
    from hpt_dsl.data.files import load_questions
    from hpt_dsl.settings import DataSettings
    from hpt_dsl.train import run_recipe, step_questions

    (tmp_path / "my_reward.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    over = [*SMALL, "data.reward=my_reward:even_answer", "train.steps=1", "train.questions=4",
            "rollout.max_new_tokens=16", "data.max_test=1"]
    result = run_recipe(RECIPE, overrides=over, output=tmp_path / "run", quiet=True)
    [r] = [x for x in _lines(result.run_dir) if x["kind"] == "train"]
    train = load_questions(str(ROOT / "data/train/gsm8k_train.jsonl"), DataSettings())
    chosen = [train[i] for i in step_questions(len(train), 4, 0, 0)]
    even = sum(int(q.answer) % 2 == 0 for q in chosen) / len(chosen)
    assert 0 < even < 1  # both branches are taken in this step
    assert r["acc"] == pytest.approx(even)
    assert r["gate/grpo"] == pytest.approx(even) and r["gate/sft"] == pytest.approx(1 - even)
    assert r["loss/grpo"] == 0.0  # every rollout of an RL question scored alike: zero advantage
    assert 0.2 < r["loss/sft"] < 4.0 and math.isfinite(r["loss"])


def test_the_papers_two_prompt_styles(smollm2: str) -> None:
    """Qwen style: the chat template with no system prompt; LLaMA style: a raw template."""
    from transformers import AutoTokenizer

    from hpt_dsl.prompting import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    question = "What is $1+1$?"
    chat = tokenizer.decode(encode_prompt(tokenizer, question, ModelSettings(name="smollm2-135m")))
    assert chat.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    template = "Question: {question}\nAnswer: Let's think step by step."
    raw = encode_prompt(tokenizer, question, ModelSettings(name="smollm2-135m", prompt_template=template))
    assert tokenizer.decode(raw) == template.format(question=question)
    system = ModelSettings(name="smollm2-135m", system_prompt="Reason, then answer in \\boxed{}.")
    assert "<|im_start|>system\nReason, then answer in \\boxed{}.<|im_end|>" in tokenizer.decode(
        encode_prompt(tokenizer, question, system)
    )
