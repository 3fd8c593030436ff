"""Corners: finite losses and the right (often zero) gradients where frameworks go wrong."""

from __future__ import annotations

import pytest
import torch

from hpt_dsl.estimator import compile_loss, compile_spec
from hpt_dsl.recipe import Arith, Call, Compare, Const, EstimatorSpec, Gate, Scale, Stat, Term

GRPO = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), name="grpo")
SFT = EstimatorSpec(on="demos", name="sft")
HPT = Gate(((Compare("<=", Stat("acc"), Const(0.0)), Term(SFT)),), Term(GRPO))


def inputs(
    rewards: list[float], demo: list[bool], gid: list[int], T: int = 4, lengths: list[int] | None = None
):
    B = len(rewards)
    lengths = lengths if lengths is not None else [T] * B
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1
    lp = (old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    return dict(
        logprobs=lp,
        old_logprobs=old,
        rewards=torch.tensor(rewards, dtype=torch.float64),
        is_demo=torch.tensor(demo),
        group_ids=torch.tensor(gid),
        response_mask=mask,
    )


def run(loss, kw):
    prog = compile_loss(loss) if not isinstance(loss, EstimatorSpec) else compile_spec(loss)
    out = prog(**kw)
    out.loss.backward()
    return out, kw["logprobs"].grad


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_all_rollouts_equal_give_zero_advantage_not_nan(reward: float) -> None:
    kw = inputs([reward] * 4, [False] * 4, [0] * 4)
    out, grad = run(GRPO, kw)
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert float(out.metrics["adv_mean"]) == 0.0


def test_group_of_one_rollout_gives_zero_advantage() -> None:
    kw = inputs([1.0, 0.0, 1.0], [False] * 3, [0, 1, 2])
    out, grad = run(GRPO, kw)
    assert out.loss.item() == 0.0 and not grad.any()


def test_no_demonstrations_in_the_batch() -> None:
    """Every question goes to SFT (acc = 0) but the batch holds no demonstration: the SFT
    term has no token; the loss is exactly 0 (not NaN) and the gradient is zero."""
    kw = inputs([0.0] * 4, [False] * 4, [0, 0, 1, 1])
    out, grad = run(HPT, kw)
    assert out.loss.item() == 0.0 and not grad.any()
    assert float(out.metrics["gate/sft"]) == pytest.approx(1.0) and float(out.metrics["gate/grpo"]) == 0.0
    assert float(out.metrics["loss/sft"]) == 0.0


def test_only_demonstrations() -> None:
    """SFT on demonstrations alone; the RL term has no rollout and contributes 0."""
    kw = inputs([1.0, 1.0], [True, True], [0, 1], lengths=[4, 2])
    out, grad = run(HPT, kw)
    mask = kw["response_mask"]
    expected = -(kw["logprobs"].detach() * mask).sum() / mask.sum()
    assert out.loss.item() == pytest.approx(float(expected), abs=1e-12)
    torch.testing.assert_close(grad, -mask.double() / mask.sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "agg",
    [
        Call("token_mean"),
        Call("seq_mean_token_mean"),
        Call("seq_mean_token_sum"),
        Call("token_sum_norm", (8,)),
    ],
)
def test_zero_length_responses(agg: Call) -> None:
    spec = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), agg=agg)
    kw = inputs([1.0, 0.0, 1.0, 0.0], [False] * 4, [0] * 4, lengths=[0, 0, 0, 0])
    out, grad = run(spec, kw)
    assert out.loss.item() == 0.0 and not grad.any()
    # one empty row among real ones: it takes no share of the normaliser
    kw = inputs([1.0, 0.0, 1.0, 0.0], [False] * 4, [0] * 4, lengths=[0, 3, 2, 4])
    out, grad = run(spec, kw)
    assert torch.isfinite(out.loss) and grad[1:].abs().sum() > 0 and not grad[0].any()


def test_all_tokens_clipped() -> None:
    """Every ratio is outside the clip range in the direction its advantage favours: the loss
    is the clipped constant -A (1 + eps) resp. -A (1 - eps), and the gradient is exactly zero."""
    kw = inputs([1.0, 0.0], [False, False], [0, 0], T=3)
    old = kw["old_logprobs"]
    lp = torch.stack([old[0] + 0.5, old[1] - 0.5]).requires_grad_()  # r = e^0.5 for A > 0, e^-0.5 for A < 0
    kw["logprobs"] = lp
    out, grad = run(GRPO, kw)
    a = 1 / (2**-0.5 + 1e-6)  # group_norm of (1, 0): +-0.5 / (std + eps)
    expected = -(3 * a * 0.5 * 1.2 + 3 * -a * 0.5 * 0.8) / 6
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)
    assert not grad.any()
    assert float(out.metrics["clip_frac"]) == pytest.approx(1.0)


def test_gate_sends_every_question_one_way() -> None:
    kw = inputs([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], [False, False, True, False, False, True], [0, 0, 0, 1, 1, 1])
    out, grad = run(HPT, kw)
    assert float(out.metrics["gate/grpo"]) == pytest.approx(1.0) and float(out.metrics["gate/sft"]) == 0.0
    assert not grad[[2, 5]].any()  # demonstrations carry no gradient when nothing goes to SFT
    assert grad[[0, 1]].abs().sum() > 0


def test_junk_in_padding_never_leaks() -> None:
    """NaN / inf in padding positions of every input give a finite loss and finite gradients."""
    spec = EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("gae", (1.0, 0.9)), kl=Call("k3", (0.1,))
    )
    kw = inputs([1.0, 0.0], [False, False], [0, 0], T=5, lengths=[2, 5])
    pad = ~kw["response_mask"]
    kw["old_logprobs"] = kw["old_logprobs"].masked_fill(pad, float("nan"))
    kw["ref_logprobs"] = torch.zeros(2, 5, dtype=torch.float64).masked_fill(pad, float("inf"))
    kw["values"] = torch.ones(2, 5, dtype=torch.float64).masked_fill(pad, float("-inf")).requires_grad_()
    out, grad = run(spec, kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad[0, 2:].eq(0).all()


def test_non_finite_gate_weight_is_zeroed_and_reported() -> None:
    """1 / acc at acc = 0 would poison the batch: that question's weight becomes 0 and a metric says so."""
    loss = Scale(Arith("/", Const(1.0), Stat("acc")), Term(GRPO))
    kw = inputs([1.0, 0.0, 0.0, 0.0], [False] * 4, [0, 0, 1, 1])
    out, grad = run(loss, kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert not grad[2:].any() and grad[:2].abs().sum() > 0
    assert float(out.metrics["gate/grpo/nonfinite"]) == pytest.approx(0.5)


def test_truncated_is_metrics_cover_only_the_rollouts_the_loss_uses() -> None:
    """A gated-out question's rollouts get no pi_old pass (the loop leaves their old log-probs 0):
    the mismatch and truncation shares are over the used rollout tokens only."""
    from hpt_dsl import load_recipe
    from hpt_dsl.estimator import compile_recipe

    prog = compile_recipe(load_recipe(text="loss = if acc > 0 then grpo else sft\nrollout.tis_cap = 2.0\n"))
    B, T = 6, 3
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    demo = torch.tensor([False, False, True, False, False, True])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # question 1 unsolved: SFT
    rollout_lp = torch.full((B, T), -1.0, dtype=torch.float64)
    old = rollout_lp.clone()
    old[3:5] = 0.0  # never computed: the rows are gated out
    prep = prog.prepare(response_mask=torch.ones(B, T, dtype=torch.bool), rewards=rewards, group_ids=gid,
                        is_demo=demo, old_logprobs=old, rollout_logprobs=rollout_lp)  # fmt: skip
    assert float(prep.row_metrics["tis/mismatch"].sum()) == pytest.approx(0.0)
    assert float(prep.row_metrics["tis/trunc_frac"].sum()) == pytest.approx(0.0)
