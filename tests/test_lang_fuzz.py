"""Property test: thousands of mutated, truncated, garbled and pathological recipes go
through decoding, parsing, checking and rendering; every outcome is diagnostics (or a
recipe), never another exception."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpt_dsl.lang import RecipeError, analyse, load_recipe
from hpt_dsl.lang.diagnostics import Diagnostic
from hpt_dsl.lang.explain import explain
from hpt_dsl.lang.load import decode

ROOT = Path(__file__).resolve().parent.parent
CORPUS = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.hpt"))] + [
    "let eps = 0.3\nlet mine = grpo mask=clip(eps, 0.28) kl=k3(0.001) entropy=0.001\nloss = mine",
    "loss = acc * grpo + (1 - acc) * sft\nrollout { n = 4  temperature = 0.7 }\ntrain.steps = 5",
    "loss = if step < 10 then sft elif not acc > 0 or solved == 1 then luffy else 0.5 * dapo - 0",
    "mask=dual_clip(0.2, 3) denom=pi_old adv=rloo grad=shaped(0.1) agg=token_sum_norm on=rollouts+demos",
    'model { name = "tiny" }\ntrain.betas = (0.9, 0.95)\ncritic { lr = 1e-3 }\nloss = ppo',
]
SNIPPETS = [
    "(",
    ")",
    "{",
    "}",
    "=",
    "+",
    "*",
    "/",
    "-",
    ",",
    ".",
    "#",
    '"',
    "\n",
    "if",
    "then",
    "else",
    "elif",
    "let",
    "loss",
    "acc",
    "grpo",
    "mask=",
    "clip(",
    "1e999",
    "9" * 500,
    "rollouts+demos",
    "\x00",
    "\t",
]


def outcome_is_clean(text: str) -> None:
    out = analyse(text=text)
    assert all(isinstance(d, Diagnostic) for d in out.diagnostics)
    for d in out.diagnostics:
        assert d.code and d.message
        d.render()
        d.to_dict()
    assert (out.recipe is None) == any(d.is_error for d in out.diagnostics)
    if out.recipe is not None:
        json.dumps(explain(out.recipe))


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate", "snippet"]))
        i = draw(st.integers(0, len(text)))
        if kind == "truncate":
            text = text[:i]
        elif kind == "flip" and text:
            j = min(i, len(text) - 1)
            text = text[:j] + draw(st.characters()) + text[j + 1 :]
        elif kind == "insert":
            text = text[:i] + draw(st.text(max_size=8)) + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 10)) :]
        elif kind == "duplicate":
            text = text[:i] + text[i : i + draw(st.integers(1, 20))] * 2 + text[i:]
        else:
            text = text[:i] + draw(st.sampled_from(SNIPPETS)) + text[i:]
    return text


FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(mutated())
def test_mutated_recipes_give_diagnostics_only(text: str) -> None:
    outcome_is_clean(text)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200))
def test_random_bytes_are_decoded_or_rejected(raw: bytes) -> None:
    _, text, problem = decode(raw, "fuzz.hpt")
    assert (text is None) == (problem is not None)
    if problem is not None:
        problem.render()
    else:
        assert text is not None
        outcome_is_clean(text)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    outcome_is_clean(text)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutated(), st.lists(st.text(max_size=20), max_size=3))
def test_mutated_overrides(text: str, overrides: list[str]) -> None:
    out = analyse(text=text, overrides=overrides)
    for d in out.diagnostics:
        d.render()


def test_pathological_inputs() -> None:
    cases = {
        "parentheses": "loss = " + "(" * 10_000 + "grpo" + ")" * 10_000,
        "unary minus": "loss = " + "-" * 10_000 + "grpo",
        "not": "loss = if " + "not " * 5_000 + "acc > 0 then grpo else sft",
        "nested gates": "loss = " + "if acc > 0 then grpo else " * 2_000 + "sft",
        "huge number": "loss = " + "9" * 5_000 + " * grpo",
        "huge setting": "loss = sft\ntrain.steps = " + "9" * 5_000,
        "empty": "",
        "whitespace": " \n\t\n",
        "long line": "loss = grpo " + "entropy=0.1 " * 2_000,
    }
    for name, text in cases.items():
        out = analyse(text=text)
        assert out.recipe is None, name
        codes = {d.code for d in out.errors}
        assert codes & {"E004", "E006", "E014", "E016"}, (name, codes)
        for d in out.diagnostics:
            d.render()


def test_long_flat_sum_is_fine() -> None:
    recipe = load_recipe(text="loss = " + " + ".join(["sft"] * 2_000))
    assert recipe.needs.demos


def test_deep_nesting_raises_recipe_error_not_recursion_error() -> None:
    try:
        load_recipe(text="loss = " + "-" * 10_000 + "grpo")
    except RecipeError as e:
        assert e.diagnostics[0].code == "E004"
        assert e.diagnostics[0].message == "expression nested too deeply"
    else:
        raise AssertionError("expected a RecipeError")
