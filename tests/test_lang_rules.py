"""One failing recipe per checker rule: the expected code, message, position and fix."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hpt_dsl.lang import RecipeError, analyse, load_recipe
from hpt_dsl.lang.diagnostics import Diagnostic
from hpt_dsl.settings import RolloutSettings

SEVERAL_STEPS = "train.mini_batches = 2\n"  # so that clip masks do have an effect (no W032)
N = RolloutSettings().n  # the default group size


def diags(text: str, overrides: Sequence[str] = ()) -> list[Diagnostic]:
    return analyse(text=text, overrides=overrides).diagnostics


def one(text: str, code: str, overrides: Sequence[str] = ()) -> Diagnostic:
    found = [d for d in diags(text, overrides) if d.code == code]
    assert len(found) == 1, [d.render() for d in diags(text, overrides)]
    return found[0]


def at(d: Diagnostic) -> tuple[int | None, int | None]:
    return d.line, d.col


def test_a_clean_recipe_has_no_diagnostics() -> None:
    assert diags(SEVERAL_STEPS + "loss = if acc > 0 then grpo else sft") == []


# ----- unknown component, wrong arity, out-of-range values ----------------------------------------


def test_unknown_component_key_suggests_the_closest() -> None:
    d = one("loss = grpo mak=clip(0.2)", "E010")
    assert d.severity == "error" and d.message == "unknown component 'mak'"
    assert at(d) == (1, 13) and d.hint is not None and "did you mean 'mask'" in d.hint


def test_unknown_component_key_that_is_a_setting() -> None:
    d = one("loss = grpo temperature=0.7", "E010")
    assert d.hint is not None and "rollout { temperature = ... }" in d.hint


def test_unknown_advantage_suggests_group_norm() -> None:
    d = one("loss = mask=clip(0.2) adv=group_nrom", "E012")
    assert d.message == "unknown advantage 'group_nrom'"
    assert at(d) == (1, 27) and d.end_col == 37
    assert d.hint == "did you mean 'group_norm'?"
    assert d.render().splitlines()[0] == "<recipe>:1:27: error[E012]: unknown advantage 'group_nrom'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss = grpo mask=clamp(0.2)", "unknown mask 'clamp'"),
        ("loss = grpo denom=pi_ref", "unknown denominator 'pi_ref'"),
        ("loss = grpo denom=2", "unknown denominator '2'"),
        ("loss = grpo grad=logprob", "unknown likelihood gradient 'logprob'"),
        ("loss = grpo agg=mean", "unknown aggregation 'mean'"),
        ("loss = grpo on=demonstrations", "unknown row set 'demonstrations'"),
        ("loss = grpo group=demos", "unknown group 'demos'"),
        ("loss = grpo kl=k4(0.1)", "unknown KL estimator 'k4'"),
        ("loss = grpo entropy=high", "entropy takes a coefficient, not 'high'"),
    ],
)
def test_unknown_component_values(text: str, message: str) -> None:
    assert one(text, "E012").message == message


@pytest.mark.parametrize(
    ("text", "message", "col"),
    [
        ("loss = grpo mask=clip(0.1, 0.2, 0.3)", "clip takes 1 or 2 arguments, got 3", 18),
        ("loss = grpo mask=clip", "clip takes 1 or 2 arguments, got 0", 18),
        ("loss = ppo adv=gae(0.9)", "gae takes 2 or 3 arguments, got 1", 16),
        ("loss = grpo kl=k3", "k3 takes 1 argument, got 0", 16),
        (
            "loss = grpo agg=token_sum_norm(1, 2)",
            "token_sum_norm takes no arguments or 1 argument, got 2",
            17,
        ),
    ],
)
def test_wrong_arity(text: str, message: str, col: int) -> None:
    d = one(text, "E013")
    assert d.message == message and at(d) == (1, col)
    assert d.hint is not None and d.hint.startswith("write ")


@pytest.mark.parametrize(
    ("text", "message", "col"),
    [
        (
            "loss = grpo mask=clip(1.5)",
            "clip: eps_low = 1.5 is out of range: a clip range must be in (0, 1)",
            23,
        ),
        ("loss = grpo mask=clip(0.2, 0)", "clip: eps_high = 0 is out of range", 28),
        (
            "loss = grpo mask=dual_clip(0.2, 0.5)",
            "dual_clip: c = 0.5 is out of range: c must be a finite number > 1",
            33,
        ),
        ("loss = ppo adv=gae(1.2, 0.95)", "gae: gamma = 1.2 is out of range: must be in [0, 1]", 20),
        ("loss = ppo adv=gae(1, -0.1)", "gae: lambda = -0.1 is out of range", 23),
        ("loss = grpo grad=shaped(0)", "shaped: gamma = 0 is out of range", 25),
        ("loss = grpo kl=k3(-1)", "k3: coef = -1 is out of range", 19),
    ],
)
def test_out_of_range_arguments(text: str, message: str, col: int) -> None:
    d = one(text, "E014")
    assert d.message.startswith(message) and at(d) == (1, col)


@pytest.mark.parametrize(
    ("text", "col"),
    [
        ("loss = 1e999 * grpo", 8),
        ("loss = grpo adv=const(1e400)", 23),
        ("loss = grpo entropy=1e309", 21),
        ("loss = " + "9" * 400 + " * grpo", 8),
    ],
)
def test_huge_numbers_are_out_of_range(text: str, col: int) -> None:
    d = one(text, "E014")
    assert "out of range" in d.message and at(d) == (1, col)


def test_coefficients_must_be_finite() -> None:
    assert "overflows" in one("loss = 1e300 * 1e300 * grpo", "E014").message
    assert one("loss = grpo / 0", "E014").message == "division by zero"


def test_component_given_twice() -> None:
    d = one("loss = grpo mask=clip(0.2) mask=none", "E016")
    assert at(d) == (1, 28) and "'mask' is given twice" in d.message


# ----- names and kinds ------------------------------------------------------------------------------


def test_unknown_name_suggests_the_closest() -> None:
    d = one("loss = grop", "E011")
    assert d.message == "unknown name 'grop'" and d.hint == "did you mean 'grpo'?" and at(d) == (1, 8)


def test_a_component_value_used_as_a_name() -> None:
    d = one("loss = reward", "E011")
    assert d.hint is not None and "adv=reward" in d.hint


def test_used_before_definition() -> None:
    d = one("let a = b mask=none\nlet b = grpo\nloss = a", "E011")
    assert "'b' is used before its definition (line 2)" in d.message and at(d) == (1, 9)


def test_defined_twice_and_two_losses_and_statistics() -> None:
    assert at(one("let a = 1\nlet a = 2\nloss = sft", "E017")) == (2, 5)
    assert "second loss" in one("loss = sft\nloss = grpo", "E017").message
    assert "built-in statistic" in one("let acc = 3\nloss = sft", "E017").message


def test_no_loss() -> None:
    d = one("rollout { n = 4 }", "E006")
    assert d.hint is not None and "loss = grpo" in d.hint


@pytest.mark.parametrize(
    ("text", "message", "col"),
    [
        ("loss = grpo * sft", "cannot multiply two losses", 15),
        ("loss = 0.5 + grpo", "cannot add a number to a loss", 8),
        ("loss = acc + grpo", "cannot add a statistic to a loss", 8),
        ("loss = 2", "the loss must be an estimator or a combination of estimators, found the number 2", 8),
        ("loss = acc", "the loss must be an estimator or a combination of estimators, found a statistic", 8),
        ("loss = if grpo then sft else grpo", "expected a condition, found an estimator", 11),
        ("loss = if acc > 0 then 1 else sft", "a gate branch must be an estimator", 24),
        ("loss = (acc > 0) * grpo", "a condition cannot be multiplied", 9),
        (
            "loss = if sft > 0 then grpo else sft",
            "only numbers and statistics can be compared, not an estimator",
            11,
        ),
        (
            "loss = grpo mask=clip(acc)",
            "the arguments of clip must be constant numbers, found a statistic",
            23,
        ),
        ("loss = 1 / grpo", "cannot divide by a loss", 12),
    ],
)
def test_type_errors(text: str, message: str, col: int) -> None:
    d = one(text, "E018")
    assert d.message.startswith(message) and at(d) == (1, col)


def test_components_on_a_loss_or_a_constant() -> None:
    d = one("loss = luffy mask=clip(0.3)", "E019")
    assert "'luffy' is a loss made of several estimators" in d.message and at(d) == (1, 8)
    assert "not an estimator" in one("loss = gamma mask=none", "E019").message


# ----- the semantic rules -------------------------------------------------------------------


def test_pi_old_on_demonstrations_is_an_error() -> None:
    d = one("loss = sft denom=pi_old", "E020")
    assert d.message == "denom=pi_old on demonstrations: demonstrations have no old-policy log-probs"
    assert at(d) == (1, 12) and d.hint is not None and "denom=1" in d.hint and "denom=pi_theta" in d.hint
    assert one("loss = grpo on=rollouts+demos group=rollouts+demos", "E020").severity == "error"


def test_clip_with_pi_theta_is_a_warning() -> None:
    d = one("loss = mask=clip(0.2) denom=pi_theta adv=reward", "W031")
    assert d.severity == "warning" and "identically 1" in d.message and at(d) == (1, 8)
    load_recipe(text="loss = mask=clip(0.2) denom=pi_theta adv=reward")  # a warning does not fail


def test_group_advantage_with_one_rollout_is_an_error() -> None:
    d = one("loss = rloo\nrollout { n = 1 }", "E021")
    assert d.message.startswith("adv=rloo with rollout.n = 1") and at(d) == (1, 8)
    assert d.hint is not None and "n = 8" in d.hint
    assert one("loss = grpo", "E021", overrides=["rollout.n=1"]).severity == "error"


def test_gae_without_critic_says_what_to_add() -> None:
    d = one("loss = ppo", "E022")
    assert "needs a critic" in d.message and d.hint == "add the line `critic { lr = 1e-3 }`"
    assert [x for x in diags("loss = ppo\ncritic { lr = 1e-3 }") if x.is_error] == []


def test_gate_on_acc_without_rollouts_is_an_error() -> None:
    d = one("loss = if acc > 0 then sft else 0", "E023")
    assert "gate on 'acc'" in d.message and at(d) == (1, 11)
    assert [x for x in diags("loss = if step < 5 then sft else 0") if x.is_error] == []


def test_incompatible_components() -> None:
    d = one("loss = grpo mask=cispo(0.2) denom=pi_theta", "E024")
    assert "needs denom=pi_old" in d.message and at(d) == (1, 29)
    assert "needs denom=pi_old_seq" in one("loss = grpo mask=seq_clip(0.01)", "E024").message
    assert one("loss = on=demos adv=group_norm", "E024").hint == "write group=rollouts+demos"


def test_gate_branch_that_is_never_taken() -> None:
    d = one(SEVERAL_STEPS + "loss = if acc > 1 then grpo else sft", "W030")
    assert d.message == "this gate branch is never taken: its condition is never true" and at(d) == (2, 11)
    assert d.hint is not None and f"acc is in {{0, 1/{N}, ..., 1}}" in d.hint
    d = one(SEVERAL_STEPS + "loss = if acc > 0 then grpo elif acc > 0.5 then dapo else sft", "W030")
    assert "already cover" in d.message and at(d) == (2, 34)
    d = one(SEVERAL_STEPS + "loss = if acc >= 0 then grpo else sft", "W030")
    assert d.message.startswith("the else branch is never taken") and at(d) == (2, 35)
    d = one(SEVERAL_STEPS + "loss = if acc == 0.3 then grpo else sft", "W030")
    assert "never true" in d.message
    d = one(SEVERAL_STEPS + "loss = if step < 30 then sft else grpo\ntrain.steps = 20", "W030")
    assert "else branch" in d.message and d.hint is not None and "step is 0..19" in d.hint


def test_pass_rate_threshold_between_grid_points_names_the_equivalent_one() -> None:
    four = SEVERAL_STEPS + "rollout.n = 4\n"
    d = one(four + "loss = if acc > 1/8 then grpo else sft", "W033")
    assert d.message == ("with rollout.n = 4, acc is a multiple of 1/4: `acc > 0.125` selects the same "
                         "questions as `acc > 0`") and at(d) == (3, 11)  # fmt: skip
    assert "rollout.n = 8" in (d.hint or "")
    d = one(four + "loss = if acc >= 0.3 and step > 2 then grpo else sft", "W033")
    assert "`acc >= 0.5`" in d.message
    d = one(four + "loss = if 0.6 < acc then grpo else sft", "W033")
    assert "`0.5 < acc`" in d.message
    # a prelude loss under the recipe's own gamma: reported where gamma is set
    d = one(four + "let gamma = 1/8\nloss = hpt", "W033")
    assert at(d) == (3, 5) and "`acc > 0`" in d.message
    d = one(four + "loss = hpt", "W033", overrides=["gamma=0.1"])
    assert d.file == "--set"
    for text in ("rollout.n = 8\nlet gamma = 1/8\nloss = hpt", "loss = if acc > 0.25 then grpo else sft",
                 "loss = if acc > 0 then grpo else sft", "loss = if acc == 0.3 then grpo else sft"):
        assert [d for d in diags(four + text) if d.code == "W033"] == [], text


def test_reachable_gates_do_not_warn() -> None:
    for cond in (
        "acc > 0",
        f"acc > {N - 1}/{N}",
        f"solved >= {N}",
        "reward_std > 0",
        "step < 59",
        "acc > 0 and step > 3",
    ):
        assert diags(SEVERAL_STEPS + f"loss = if {cond} then grpo else sft") == [], cond


def test_clip_with_one_update_per_batch_has_no_effect() -> None:
    assert [x for x in diags("loss = grpo") if x.code == "W032"] == []  # the default: 2 mini-batches
    d = one("loss = grpo\ntrain.mini_batches = 1", "W032")
    assert d.message.startswith("mask=clip(0.2) has no effect in this run")
    assert at(d) == (1, 8) and d.hint is not None and "train.mini_batches" in d.hint
    for fix in ("train.epochs = 2", "train.mini_batches = 4", "rollout.old_logprobs = engine"):
        assert [x for x in diags(f"loss = grpo\ntrain.mini_batches = 1\n{fix}") if x.code == "W032"] == [], fix


def test_other_knobs_with_no_effect() -> None:
    d = one(SEVERAL_STEPS + "loss = grpo kl=k3(0)", "W032")
    assert d.message == "kl=k3(0) has no effect (its coefficient is 0)" and at(d) == (2, 13)
    d = one("loss = mask=none denom=pi_theta grad=shaped(0.1) adv=reward", "W032")
    assert "grad=shaped(0.1) has no effect with denom=pi_theta" in d.message
    d = one(SEVERAL_STEPS + "loss = grpo\nrollout { old_logprobs = engine  top_p = 0.9 }", "W032")
    assert "renormalises" in d.message and at(d) == (3, 11)


def test_errors_raise_recipe_error_with_every_diagnostic() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(text="loss = grpo mak=clip(0.2) adv=group_nrom")
    codes = sorted(d.code for d in info.value.diagnostics)
    assert codes == ["E010", "E012"]
    assert "did you mean 'group_norm'?" in str(info.value)


def test_warnings_are_on_the_recipe() -> None:
    recipe = load_recipe(text="loss = grpo\ntrain.mini_batches = 1")
    assert [w.code for w in recipe.warnings] == ["W032"]
