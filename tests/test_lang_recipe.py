"""The checker's output is the IR of hpt_dsl.recipe: normalised estimators, loss trees,
settings, needs; and the prelude holds the published algorithms."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpt_dsl.lang import RecipeError, analyse, check, load_recipe
from hpt_dsl.lang.explain import explain, formula, match_estimator, signature
from hpt_dsl.lang.load import prelude_estimators
from hpt_dsl.recipe import (
    Arith,
    Call,
    Compare,
    Const,
    EstimatorSpec,
    Gate,
    Joint,
    Needs,
    Scale,
    Stat,
    Sum,
    Term,
    Zero,
)
from hpt_dsl.settings import RolloutSettings

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def spec(text: str, *overrides: str) -> EstimatorSpec:
    loss = load_recipe(text=text, overrides=overrides).loss
    assert isinstance(loss, Term)
    return loss.estimator


# ----- estimators -----------------------------------------------------------------------------------


def test_the_users_line_compiles_to_a_full_estimator_spec() -> None:
    s = spec("mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik")
    assert s == EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"))
    assert s.name == "estimator"


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("mask=clip(0.2)", "mask", Call("clip", (0.2, 0.2))),
        ("mask=clip(0.2, 0.28)", "mask", Call("clip", (0.2, 0.28))),
        ("mask=dual_clip(0.2, 3)", "mask", Call("dual_clip", (0.2, 0.2, 3.0))),
        ("mask=dual_clip(0.1, 0.2, 3)", "mask", Call("dual_clip", (0.1, 0.2, 3.0))),
        ("mask=seq_clip(3e-4) denom=pi_old_seq", "mask", Call("seq_clip", (3e-4, 3e-4))),
        ("mask=cispo(0.28) denom=pi_old", "mask", Call("cispo", (0.28,))),
        ("adv=const(-1)", "adv", Call("const", (-1.0,))),
        ("adv=2", "adv", Call("const", (2.0,))),
        ("adv=-1", "adv", Call("const", (-1.0,))),
        ("adv=gae(1, 0.95)", "adv", Call("gae", (1.0, 0.95))),
        ("denom=1", "denom", "1"),
        ("grad=shaped(0.1) denom=1", "grad", Call("shaped", (0.1,))),
        ("agg=token_sum_norm(512)", "agg", Call("token_sum_norm", (512.0,))),
        ("agg=token_sum_norm", "agg", Call("token_sum_norm", (float(RolloutSettings().max_new_tokens),))),
        ("kl=k3(0.001)", "kl", Call("k3", (0.001,))),
        ("kl=none", "kl", None),
        ("entropy=0.001", "entropy", 0.001),
        ("on=rollouts + demos group=demos+rollouts", "group", "rollouts+demos"),
        ("mask=clip(1/8)", "mask", Call("clip", (0.125, 0.125))),
    ],
)
def test_arguments_are_normalised(text: str, key: str, value: object) -> None:
    setup = "critic { }\n" if "gae" in text else ""
    assert getattr(spec(setup + "loss = " + text), key) == value


def test_token_sum_norm_length_follows_the_generation_budget() -> None:
    s = spec("loss = dr_grpo", "rollout.max_new_tokens=128")
    assert s.agg == Call("token_sum_norm", (128.0,))


def test_derived_estimators_override_only_what_they_name() -> None:
    dapo = spec("loss = grpo mask=clip(0.2, 0.28) agg=token_mean")
    assert dapo == spec("loss = dapo")
    assert dapo.name == "grpo"
    assert spec("let mine = grpo kl=k3(0.04)\nloss = mine").name == "mine"


def test_let_constants_feed_component_arguments_and_overrides() -> None:
    text = "let eps = 0.3\nloss = grpo mask=clip(eps)"
    assert spec(text).mask == Call("clip", (0.3, 0.3))
    assert spec(text, "eps=0.1").mask == Call("clip", (0.1, 0.1))


def test_user_definitions_shadow_the_prelude() -> None:
    assert spec("let grpo = sft\nloss = grpo").on == "demos"
    assert spec("let grpo = grpo mask=none\nloss = grpo").mask == Call("none")


# ----- loss trees -----------------------------------------------------------------------------------


def test_hpt_gate() -> None:
    r = load_recipe(text="loss = if acc > gamma then grpo else sft")
    assert isinstance(r.loss, Gate)
    ((cond, then),) = r.loss.branches
    assert cond == Compare(">", Stat("acc"), Const(0.0))
    assert isinstance(then, Term) and then.estimator.name == "grpo"
    assert isinstance(r.loss.orelse, Term) and r.loss.orelse.estimator.name == "sft"
    assert list(r.estimators) == ["grpo", "sft"]


def test_gamma_override_moves_the_threshold() -> None:
    r = load_recipe(text="loss = if acc > gamma then grpo else sft", overrides=["gamma=2/8"])
    assert isinstance(r.loss, Gate)
    assert r.loss.branches[0][0] == Compare(">", Stat("acc"), Const(0.25))


def test_constant_arithmetic_is_folded() -> None:
    r = load_recipe(text="loss = if acc > 1/8 then grpo else sft")
    assert isinstance(r.loss, Gate) and r.loss.branches[0][0] == Compare(">", Stat("acc"), Const(0.125))


def test_soft_gate_coefficients_are_scalar_expressions() -> None:
    r = load_recipe(text="loss = acc * grpo + (1 - acc) * sft")
    assert isinstance(r.loss, Sum)
    first, second = r.loss.items
    assert isinstance(first, Scale) and first.coef == Stat("acc")
    assert isinstance(second, Scale) and second.coef == Arith("-", Const(1.0), Stat("acc"))


def test_mix_on_weighted_sum_inside_a_gate() -> None:
    r = load_recipe(RECIPES / "mix_on.hpt")
    assert isinstance(r.loss, Gate) and isinstance(r.loss.orelse, Sum)
    weighted, off = r.loss.orelse.items
    assert isinstance(weighted, Scale) and weighted.coef == Const(0.1)
    assert isinstance(off, Term) and off.estimator.name == "luffy_off"


def test_zero_subtraction_and_elif() -> None:
    r = load_recipe(text="loss = if step < 10 then sft elif acc > 0 then grpo - 0.5 * sft else 0")
    assert isinstance(r.loss, Gate) and len(r.loss.branches) == 2
    assert r.loss.orelse == Zero()
    rl = r.loss.branches[1][1]
    assert isinstance(rl, Sum) and rl.items[1] == Scale(Const(-1.0), Scale(Const(0.5), rl.items[1].loss.loss))


def test_luffy_is_the_sum_of_its_parts_under_one_normaliser() -> None:
    r = load_recipe(text="loss = luffy")
    assert isinstance(r.loss, Joint) and isinstance(r.loss.loss, Sum)
    assert [t.estimator.name for t in r.loss.loss.items] == ["luffy_on", "luffy_off"]  # type: ignore[union-attr]


def test_same_name_different_estimators_get_distinct_names() -> None:
    r = load_recipe(text="loss = if acc > 0 then grpo else grpo kl=k3(0.01)")
    assert list(r.estimators) == ["grpo", "grpo_2"]
    assert r.estimators["grpo_2"].kl == Call("k3", (0.01,))


# ----- needs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needs"),
    [
        ("loss = sft", Needs(demos=True)),
        ("loss = grpo", Needs(rollouts=True, old_logprobs=True)),
        ("loss = reinforce", Needs(rollouts=True)),
        ("loss = ppo\ncritic { }", Needs(rollouts=True, old_logprobs=True, critic=True)),
        ("loss = cispo", Needs(rollouts=True, old_logprobs=True)),
        ("loss = reinforce kl=k2(0.01) entropy=0.001", Needs(rollouts=True, ref_model=True, entropy=True)),
        ("loss = luffy_off", Needs(rollouts=True, demos=True)),
        ("loss = if acc > 0 then grpo else sft", Needs(rollouts=True, demos=True, old_logprobs=True)),
        ("loss = acc * sft", Needs(rollouts=True, demos=True)),
        ("loss = if step < 10 then sft else 0", Needs(demos=True)),
    ],
)
def test_needs(text: str, needs: Needs) -> None:
    assert load_recipe(text=text).needs == needs


# ----- settings ---------------------------------------------------------------------------------------


def test_settings_from_blocks_dotted_lines_and_overrides() -> None:
    r = load_recipe(
        text="loss = sft\nrollout { n = 4  temperature = 0.7 }\ntrain.steps = 3\n"
        'model.name = "smollm2-135m"\n'
        "train.betas = (0.9, 0.95)\nlearner.offload = true\ntrain.output_dir = none",
        overrides=["train.steps=5", "rollout.engine=vllm"],
    )
    st = r.settings
    assert (st.rollout.n, st.rollout.temperature, st.train.steps, st.rollout.engine) == (4, 0.7, 5, "vllm")
    assert (st.model.name, st.train.betas, st.learner.offload, st.train.output_dir) == (
        "smollm2-135m",
        (0.9, 0.95),
        True,
        None,
    )
    assert st.critic is None


def test_a_critic_block_enables_the_critic() -> None:
    assert load_recipe(text="loss = sft\ncritic { }").settings.critic is not None
    assert load_recipe(text="loss = sft\ncritic.lr = 1e-4").settings.critic.lr == 1e-4  # type: ignore[union-attr]


def test_settings_errors_point_at_the_setting() -> None:
    out = analyse(
        text="loss = sft\nrolout { n = 4 }\nrollout { nn = 4  engine = vlm  n = 0 }\n"
        "train.steps = 1\ntrain.steps = 2"
    )
    found = {(d.code, d.line, d.col): d for d in out.diagnostics}
    assert found[("E040", 2, 1)].hint == "did you mean 'rollout'?"
    assert found[("E041", 3, 11)].hint == "did you mean 'n'?"
    assert (
        found[("E042", 3, 28)].message
        == "invalid value for rollout.engine: Input should be 'hf', 'vllm' or 'vllm_server'"
    )
    assert "greater than or equal to 1" in found[("E042", 3, 37)].message
    assert found[("E043", 5, 7)].message == "train.steps is set twice (first at line 4)"
    assert not out.usage


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    (d,) = check("loss = sft\ncritic { zzz = 1 }")
    assert d.code == "E041" and d.hint is not None and "'lr', 'value_clip' or 'coef'" in d.hint


def test_override_errors_point_at_the_override() -> None:
    out = analyse(
        text="loss = if acc > gamma then grpo else sft",
        overrides=["gama=0.5", "rollout.nn=3", "x", "gamma=hi"],
    )
    assert out.usage
    by = {(d.code, d.line, d.col): d for d in out.diagnostics}
    assert by[("E044", 1, 1)].message == "no constant named 'gama'" and by[("E044", 1, 1)].file == "--set"
    assert by[("E044", 1, 1)].hint == "did you mean 'gamma'?"
    assert by[("E041", 2, 9)].line_text == "rollout.nn=3"
    assert by[("E044", 3, 1)].message == "malformed override 'x'"
    assert "takes a number" in by[("E044", 4, 7)].message


def test_override_of_a_non_constant() -> None:
    (d,) = [d for d in check("loss = grpo", ["grpo=1"]) if d.is_error]
    assert d.message == "'grpo' is not a constant, so --set cannot change it"


def test_out_of_range_setting_numbers() -> None:
    (d,) = check("loss = sft\ntrain.steps = " + "9" * 5000)
    assert (d.code, d.line, d.col) == ("E014", 2, 15)


# ----- prelude ---------------------------------------------------------------------------------------

PRELUDE_NAMES = (
    "sft reinforce ppo grpo dr_grpo dapo cispo gspo rloo reinforce_pp srft luffy_on luffy_off luffy".split()
)


def test_the_prelude_defines_every_stock_algorithm() -> None:
    table = prelude_estimators()
    assert set(PRELUDE_NAMES) <= set(table)


def test_prelude_estimators_have_distinct_signatures_and_match_themselves() -> None:
    table = {k: v for k, v in prelude_estimators().items() if isinstance(v, Term)}
    sigs = [signature(t.estimator) for t in table.values()]
    assert len(set(sigs)) == len(sigs)
    for name, term in table.items():
        assert match_estimator(term.estimator)["name"] == name


def test_published_hyper_parameters() -> None:
    t = {k: v.estimator for k, v in prelude_estimators().items() if isinstance(v, Term)}
    assert t["grpo"].mask == Call("clip", (0.2, 0.2)) and t["grpo"].adv.name == "group_norm"
    assert (t["dapo"].mask, t["dapo"].agg) == (Call("clip", (0.2, 0.28)), Call("token_mean"))
    assert (t["gspo"].mask, t["gspo"].denom) == (Call("seq_clip", (3e-4, 4e-4)), "pi_old_seq")
    assert t["gspo"].agg == Call("seq_mean_token_mean")
    assert (t["dr_grpo"].adv.name, t["dr_grpo"].agg.name) == ("group_mean", "token_sum_norm")
    assert t["ppo"].adv == Call("gae", (1.0, 0.95))
    assert (t["luffy_off"].grad, t["luffy_off"].denom, t["luffy_off"].group) == (
        Call("shaped", (0.1,)),
        "1",
        "rollouts+demos",
    )
    assert (t["sft"].on, t["sft"].adv) == ("demos", Call("const", (1.0,)))


# ----- explain ---------------------------------------------------------------------------------------


def test_explain_formula_for_grpo_and_luffy_off() -> None:
    f = formula(spec("loss = grpo"))
    assert (
        f["gradient"]
        == "∇ℓ_t = 𝟙[Â>0 ⇒ r ≤ 1.2; Â<0 ⇒ r ≥ 0.8] · (1/π_old) · (R − mean_G R)/std_G R · ∇π_θ(y_t)"
    )
    assert "r = π_θ(y_t)/π_old(y_t)" in f["where"]
    off = formula(spec("loss = luffy_off"))
    assert off["gradient"] == "∇ℓ_t = 0.1/(π_θ + 0.1)² · (R − mean_G R)/std_G R · ∇π_θ(y_t)"
    assert "rollouts and demonstration" in off["where"]


def test_explain_reports_a_custom_estimator_and_its_closest_algorithm() -> None:
    info = explain(load_recipe(text="loss = grpo agg=token_mean"))
    assert info["algorithm"] is None
    m = info["estimators"][0]["match"]
    assert (m["name"], m["closest"], m["differs"]) == (None, "grpo", ["agg"])


def test_errors_stop_before_a_recipe_exists() -> None:
    with pytest.raises(RecipeError):
        load_recipe(text="loss = grpo +")


def test_the_language_reference_covers_every_keyword_and_code() -> None:
    from hpt_dsl.lang.components import VOCAB
    from hpt_dsl.lang.diagnostics import CODES
    from hpt_dsl.recipe import STATS

    doc = (RECIPES.parent / "docs" / "language.md").read_text(encoding="utf-8")
    for key, forms in VOCAB.items():
        assert f"`{key}`" in doc, key
        for name in forms:
            assert name in doc, (key, name)
    for code in CODES:
        assert f"| {code} |" in doc, code
    for name in STATS + tuple(PRELUDE_NAMES):
        assert f"`{name}`" in doc, name


def test_an_override_reaches_a_user_constant_that_shadows_the_prelude() -> None:
    text = "let gamma = 0.5\nloss = if acc > gamma then grpo else sft"
    r = load_recipe(text=text, overrides=["gamma=0.25"])
    assert isinstance(r.loss, Gate) and r.loss.branches[0][0] == Compare(">", Stat("acc"), Const(0.25))


@pytest.mark.parametrize("path", sorted((RECIPES).glob("**/*.hpt")), ids=lambda p: p.name)
def test_checker_and_compiler_agree_on_what_a_recipe_needs(path) -> None:
    """One rule (hpt_dsl.recipe.estimator_needs) for the checker's needs and the compiler's."""
    from hpt_dsl.estimator.compile import derive_needs

    r = load_recipe(path)
    derived = derive_needs(list(r.estimators.values()))
    for field in ("old_logprobs", "ref_model", "critic", "entropy"):
        assert getattr(derived, field) == getattr(r.needs, field), field
