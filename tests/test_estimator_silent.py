"""Silent rows: on-policy, a row whose every token has advantage 0 (its group's rollouts all
scored the same) contributes J = 0 and no gradient under every built-in mask. ``prepare``
gives it weight 0, so a learner need not forward it, and hands over its known metrics:
the loss, the gradient and every metric are the same whether it is forwarded or not."""

from __future__ import annotations

import pytest
import torch

from hpt_dsl.batch import used_rows
from hpt_dsl.estimator import compile_loss
from hpt_dsl.learner.base import add_prepared_metrics
from hpt_dsl.recipe import Call, Compare, Const, EstimatorSpec, Gate, Stat, Term

GROUPS, N, T = 6, 4, 7
MASKS = [Call("clip", (0.2, 0.28)), Call("cispo", (0.3,)), Call("seq_clip", (0.2, 0.2)),
         Call("dual_clip", (0.2, 0.2, 3.0)), Call("none")]  # fmt: skip


def data(seed: int = 0) -> dict:
    """6 groups of 4 rollouts; groups 0 and 3 all wrong, group 4 all right (zero variance)."""
    g = torch.Generator().manual_seed(seed)
    B = GROUPS * N
    gid = torch.arange(B) // N
    rewards = (torch.rand(B, generator=g) < 0.5).double()
    rewards[gid == 0], rewards[gid == 3], rewards[gid == 4] = 0.0, 0.0, 1.0
    rewards[gid == 1] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return dict(
        response_mask=torch.arange(T)[None] < lengths[:, None], group_ids=gid,
        is_demo=torch.zeros(B, dtype=torch.bool), rewards=rewards,
        lp=-2 * torch.rand(B, T, generator=g, dtype=torch.float64),
    )  # fmt: skip


def run(program: object, d: dict, rows: torch.Tensor, **prep_kw: object) -> tuple[float, torch.Tensor, dict]:
    """(loss, d loss / d lp, metrics) over ``rows`` only, with the prepared mini-batch's
    metrics added as a learner adds them."""
    prep = program.prepare(  # type: ignore[attr-defined]
        response_mask=d["response_mask"], rewards=d["rewards"], group_ids=d["group_ids"],
        is_demo=d["is_demo"], **prep_kw,
    )  # fmt: skip
    lp = d["lp"].clone().requires_grad_(True)
    out = program.loss(prep, logprobs=lp[rows], rows=rows)  # type: ignore[attr-defined]
    out.loss.backward()
    metrics = add_prepared_metrics({k: float(v) for k, v in out.metrics.items()}, prep)
    return float(out.loss.detach()), lp.grad, metrics  # type: ignore[return-value]


@pytest.mark.parametrize("mask", MASKS, ids=lambda c: c.name)
def test_silent_rows_change_nothing_but_need_no_forward(mask: Call) -> None:
    d = data()
    spec = EstimatorSpec(mask=mask, denom="pi_old" if mask.name != "none" else "pi_theta", adv=Call("group_norm"),
                         agg=Call("seq_mean_token_mean"), name="grpo")  # fmt: skip
    program = compile_loss(Term(spec))
    prep = program.prepare(response_mask=d["response_mask"], rewards=d["rewards"], group_ids=d["group_ids"],
                           is_demo=d["is_demo"], old_is_current=True)  # fmt: skip
    used = used_rows(prep)
    gid = d["group_ids"]
    assert sorted(set(gid[used].tolist())) == [1, 2, 5]  # groups 0, 3 and 4 are silent
    # the reference: pi_old passed as numbers equal to the live log-probs, so nothing is silenced
    everyone = torch.arange(len(gid))
    ref_loss, ref_grad, ref_metrics = run(program, d, everyone, old_logprobs=d["lp"])
    for rows in (everyone, used):
        loss, grad, metrics = run(program, d, rows, old_is_current=True)
        assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-15)
        assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-15)
        assert metrics.keys() == ref_metrics.keys()
        for k, v in ref_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    assert ref_grad[gid == 1].abs().sum() > 0
    if mask.name != "none":
        assert ref_metrics["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("extra", [{"kl": Call("k3", (0.1,))}, {"entropy": 0.01}])
def test_rows_with_a_kl_or_entropy_term_stay(extra: dict) -> None:
    """A KL term or an entropy bonus moves every row, advantage or not: nothing is silenced."""
    d = data()
    spec = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), name="grpo", **extra)
    program = compile_loss(Term(spec))
    prep = program.prepare(response_mask=d["response_mask"], rewards=d["rewards"], group_ids=d["group_ids"],
                           is_demo=d["is_demo"], ref_logprobs=d["lp"] - 0.1, old_is_current=True)  # fmt: skip
    assert used_rows(prep).numel() == len(d["rewards"]) and not prep.silent_metrics


def test_off_policy_rows_stay() -> None:
    """With pi_old from an earlier pass (rho != 1) the rows' metrics are unknown: all stay."""
    d = data()
    program = compile_loss(Term(EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old",
                                              adv=Call("group_norm"), name="grpo")))  # fmt: skip
    prep = program.prepare(response_mask=d["response_mask"], rewards=d["rewards"], group_ids=d["group_ids"],
                           is_demo=d["is_demo"], old_logprobs=d["lp"])  # fmt: skip
    assert used_rows(prep).numel() == len(d["rewards"]) and not prep.silent_metrics


def test_a_gate_silences_only_its_rl_branch() -> None:
    """HPT: the SFT branch (A = 1) keeps its rows; only the RL branch's zero-variance groups go."""
    d = data()
    d["is_demo"] = torch.zeros_like(d["is_demo"])
    grpo = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), name="grpo")
    sft = EstimatorSpec(on="rollouts", name="sft")
    loss = Gate(((Compare(">", Stat("acc"), Const(0.0)), Term(grpo)),), Term(sft))
    program = compile_loss(loss)
    prep = program.prepare(response_mask=d["response_mask"], rewards=d["rewards"], group_ids=d["group_ids"],
                           is_demo=d["is_demo"], old_is_current=True)  # fmt: skip
    gid = d["group_ids"]
    # groups 0 and 3 (acc 0) go to SFT and stay; group 4 (acc 1, zero variance) is silent in grpo
    assert sorted(set(gid[used_rows(prep)].tolist())) == [0, 1, 2, 3, 5]
