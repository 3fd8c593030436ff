"""The tensor-level API: compile_estimator, prepare/loss, required inputs, TIS, entropy, registry."""

from __future__ import annotations

import math

import pytest
import torch

from hpt_dsl import compile_estimator, load_recipe
from hpt_dsl.estimator import compile_spec, lookup, names, register
from hpt_dsl.estimator.adv import AdvInputs
from hpt_dsl.lang import RecipeError
from hpt_dsl.recipe import Call, EstimatorSpec

ISSUE_EXAMPLE = "mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=token_mean"


def rollouts(B: int = 8, T: int = 5, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) - 0.1
    return dict(
        logprobs=(old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_(),
        old_logprobs=old,
        rewards=torch.tensor([1.0, 0.0] * (B // 2), dtype=dtype),
        group_ids=torch.arange(B) // 4,
        response_mask=torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g),
    )


def test_the_issue_example_runs_as_written() -> None:
    est = compile_estimator(ISSUE_EXAMPLE)
    kw = rollouts()
    out = est(**kw)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert kw["logprobs"].grad.abs().sum() > 0
    for key in ("loss", "clip_frac", "ratio_mean", "adv_mean", "gate/estimator"):
        assert key in out.metrics, key
    assert est.needs.old_logprobs and est.needs.rollouts and not est.needs.demos


def test_a_whole_recipe_with_a_gate() -> None:
    est = compile_estimator("loss = if acc > 0.25 then grpo else sft")
    kw = rollouts()
    kw["rewards"] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # acc: q0 2/3, q1 0
    kw["is_demo"] = torch.tensor([False, False, False, True, False, False, False, True])
    out = est(**kw)
    assert float(out.metrics["gate/grpo"]) == pytest.approx(0.5)
    assert float(out.metrics["gate/sft"]) == pytest.approx(0.5)
    assert float(out.metrics["branch/acc > 0.25"]) == pytest.approx(0.5)
    out.loss.backward()
    g = kw["logprobs"].grad
    assert g[[0, 1, 2]].abs().sum() > 0 and g[7].abs().sum() > 0  # rollouts of q0, demo of q1
    assert not g[[3, 4, 5, 6]].any()  # q0's demo, q1's rollouts


def test_compile_estimator_accepts_recipe_and_spec_and_rejects_other_things() -> None:
    recipe = load_recipe(text="loss = dapo")
    assert compile_estimator(recipe).terms[0].spec == recipe.loss.estimator
    assert compile_estimator(EstimatorSpec()).terms[0].spec == EstimatorSpec()
    with pytest.raises(TypeError, match="recipe text"):
        compile_estimator(42)
    with pytest.raises(RecipeError):
        compile_estimator("mask=clip(0.2) adv=group_nrom")


def test_missing_inputs_are_named() -> None:
    est = compile_estimator("loss = if acc > 0 then grpo kl=k3(0.04) else sft")
    with pytest.raises(ValueError) as e:
        est(logprobs=torch.zeros(2, 3), response_mask=torch.ones(2, 3))
    for name in ("rewards", "group_ids", "is_demo", "old_logprobs", "ref_logprobs"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="entropy"):
        compile_spec(EstimatorSpec(entropy=0.01))(logprobs=torch.zeros(2, 3), response_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="values"):
        compile_spec(EstimatorSpec(adv=Call("gae", (1.0, 1.0))))(
            logprobs=torch.zeros(1, 2), response_mask=torch.ones(1, 2), rewards=torch.ones(1)
        )


def test_wrong_shapes_are_named() -> None:
    est = compile_estimator(ISSUE_EXAMPLE)
    kw = rollouts()
    kw["rewards"] = kw["rewards"][:3]
    with pytest.raises(ValueError, match="rewards"):
        est(**kw)
    kw = rollouts()
    prep = est.prepare(**{k: v for k, v in kw.items() if k != "logprobs"})
    with pytest.raises(ValueError, match="logprobs"):
        est.loss(prep, logprobs=kw["logprobs"][:, :, None])


def test_old_is_current_equals_passing_the_detached_logprobs() -> None:
    est = compile_estimator("loss = gspo")
    kw = rollouts(dtype=torch.float64)
    prep = est.prepare(
        **{k: v for k, v in kw.items() if k not in ("logprobs", "old_logprobs")}, old_is_current=True
    )
    a = est.loss(prep, logprobs=kw["logprobs"])
    a.loss.backward()
    g_a = kw["logprobs"].grad.clone()
    kw["logprobs"].grad = None
    kw["old_logprobs"] = kw["logprobs"].detach().clone()
    b = est(**kw)
    b.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-12)
    torch.testing.assert_close(g_a, kw["logprobs"].grad, rtol=0, atol=1e-12)
    assert float(a.metrics["ratio_mean"]) == pytest.approx(1.0)


@pytest.mark.parametrize("live", [False, True])
def test_truncated_importance_sampling(live: bool) -> None:
    """Rollout-row token losses are multiplied by sg(min(pi_old / pi_rollout, C))."""
    est = compile_estimator("loss = dapo + sft\nrollout { tis_cap = 1.5 }")
    kw = rollouts(dtype=torch.float64)
    kw["is_demo"] = torch.arange(8) % 4 == 3
    B, T = kw["old_logprobs"].shape
    shift = torch.tensor([[0.0, 0.1, 1.0, -0.5, 0.2]], dtype=torch.float64).expand(B, T)
    rollout_lp = kw["old_logprobs"] - shift  # pi_old / pi_rollout = exp(shift)
    plain = est(**kw)
    plain.loss.backward()
    g_plain = kw["logprobs"].grad.clone()
    kw["logprobs"].grad = None
    inputs = {k: v for k, v in kw.items() if k != "logprobs"}
    if live:
        inputs["old_logprobs"] = None
        kw["logprobs"] = kw["old_logprobs"].clone().requires_grad_()
        plain = est(**kw)  # on-policy reference without TIS, old = current
        plain.loss.backward()
        g_plain = kw["logprobs"].grad.clone()
        kw["logprobs"].grad = None
    prep = est.prepare(**inputs, rollout_logprobs=rollout_lp, old_is_current=live)
    out = est.loss(prep, logprobs=kw["logprobs"])
    out.loss.backward()
    weight = shift.exp().clamp(max=1.5)
    rows = ~kw["is_demo"]
    torch.testing.assert_close(kw["logprobs"].grad[rows], g_plain[rows] * weight[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(kw["logprobs"].grad[~rows], g_plain[~rows], rtol=0, atol=1e-12)
    m = kw["response_mask"] & rows[:, None]
    assert float(out.metrics["tis/trunc_frac"]) == pytest.approx(float(m[:, 2].sum() / m.sum()))
    assert float(out.metrics["tis/mismatch"]) == pytest.approx(float((shift.abs() * m).sum() / m.sum()))


def test_entropy_bonus() -> None:
    """loss gains -coef * H aggregated like the term: d loss / d H = -coef * a."""
    est = compile_spec(EstimatorSpec(adv=Call("const", (0.0,)), entropy=0.1))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    H = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], requires_grad=True)
    out = est(logprobs=torch.zeros(2, 3, requires_grad=True), response_mask=mask, entropy=H)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.1 * 6.0 / 3)
    assert float(out.metrics["entropy"]) == pytest.approx(2.0)
    torch.testing.assert_close(H.grad, -0.1 * mask.float() / 3)


def test_registry_adds_a_component_with_one_function() -> None:
    @register("adv", "sign_for_test")
    def sign(inp: AdvInputs) -> torch.Tensor:
        """A_hat = sign(R - 0.5)."""
        return torch.sign(inp.rewards - 0.5)

    assert lookup("adv", "sign_for_test") is sign and "sign_for_test" in names("adv")
    est = compile_spec(EstimatorSpec(adv=Call("sign_for_test")))
    lp = torch.zeros(2, 1, requires_grad=True)
    est(logprobs=lp, rewards=torch.tensor([1.0, 0.0]), response_mask=torch.ones(2, 1)).loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5], [0.5]]))
    with pytest.raises(ValueError, match="already registered"):
        register("adv", "sign_for_test")(sign)
    with pytest.raises(ValueError, match="group_norm"):
        lookup("adv", "group_nrom")


def test_metrics_are_detached_numbers() -> None:
    out = compile_estimator("loss = grpo kl=k3(0.04)")(**rollouts(), ref_logprobs=torch.zeros(8, 5))
    for key, value in out.metrics.items():
        assert not value.requires_grad and value.dim() == 0 and math.isfinite(float(value)), key
