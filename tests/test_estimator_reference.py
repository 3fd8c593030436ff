"""Reference numbers worked out by hand from the published formulas.

GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), DAPO (Yu et al. 2025), PPO with GAE
(Schulman et al. 2016/2017), GSPO (Zheng et al. 2025), LUFFY's shaped off-policy loss
(Yan et al. 2025) and the k1 / k2 / k3 KL estimators (Schulman 2020).
"""

from __future__ import annotations

import math

import pytest
import torch

from hpt_dsl.estimator import compile_spec
from hpt_dsl.recipe import Call, EstimatorSpec
from hpt_dsl.settings import CriticSettings, Settings

D = torch.float64
EPS = 1e-6

# One question, four rollouts with rewards (1, 0, 0, 0) and lengths (2, 2, 1, 2); every
# pi_old is 0.5 and the token ratios pi_theta / pi_old are:
RATIOS = [[1.5, 1.0], [0.5, 1.0], [1.0, 0.0], [1.3, 1.0]]
LENGTHS = [2, 2, 1, 2]
# group mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
A_POS, A_NEG = 0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS)


def four_rollouts() -> dict:
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    old = torch.full((4, 2), math.log(0.5), dtype=D)
    ratio = torch.tensor(RATIOS, dtype=D).clamp(min=1e-9)
    return dict(
        logprobs=(old + ratio.log()).requires_grad_(),
        old_logprobs=old,
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D),
        group_ids=torch.zeros(4, dtype=torch.long),
        response_mask=mask,
    )


def loss_and_grad(spec: EstimatorSpec, kw: dict, settings: Settings | None = None):
    out = compile_spec(spec, settings)(**kw)
    out.loss.backward()
    return out.loss.item(), kw["logprobs"].grad, out


def test_grpo() -> None:
    """J = 1/G sum_i 1/|o_i| sum_t min(r A_i, clip(r, 0.8, 1.2) A_i)."""
    spec = EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), agg=Call("seq_mean_token_mean")
    )
    loss, grad, out = loss_and_grad(spec, four_rollouts())
    # row 0: (1.2 A+ + A+) / 2;  row 1: (0.8 A- + A-) / 2;  row 2: A-;  row 3: (1.3 A- + A-) / 2
    J = (1.1 * A_POS + 0.9 * A_NEG + A_NEG + 1.15 * A_NEG) / 4
    assert loss == pytest.approx(-J, abs=1e-12)
    assert J == pytest.approx(0.03125, abs=1e-5)  # with eps -> 0: (1.65 - 0.45 - 0.5 - 0.575) / 4
    # d(-J)/d log pi = -(1 / (G |o_i|)) r A where not clipped; rows 0 and 1 have token 0 clipped
    expected = torch.tensor(
        [[0.0, -A_POS / 8], [0.0, -A_NEG / 8], [-A_NEG / 4, 0.0], [-1.3 * A_NEG / 8, -A_NEG / 8]], dtype=D
    )
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert float(out.metrics["clip_frac"]) == pytest.approx(2 / 7)


def test_dr_grpo() -> None:
    """A = R - mean (no std); J = 1/G sum_i sum_t min(...) / L with a constant L = 4."""
    spec = EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)),
        denom="pi_old",
        adv=Call("group_mean"),
        agg=Call("token_sum_norm", (4,)),
    )
    loss, grad, _ = loss_and_grad(spec, four_rollouts())
    # sums: 1.2*0.75 + 0.75 = 1.65; 0.8*-0.25 - 0.25 = -0.45; -0.25; 1.3*-0.25 - 0.25 = -0.575
    assert loss == pytest.approx(-(1.65 - 0.45 - 0.25 - 0.575) / 16, abs=1e-12)
    assert loss == pytest.approx(-0.0234375, abs=1e-12)
    assert grad[3, 0].item() == pytest.approx(-1.3 * -0.25 / 16, abs=1e-12)


def test_dapo() -> None:
    """Clip-higher (0.8, 1.28) and a token-level mean over all 7 tokens of the group."""
    spec = EstimatorSpec(mask=Call("clip", (0.2, 0.28)), denom="pi_old", adv=Call("group_norm"))
    loss, grad, _ = loss_and_grad(spec, four_rollouts())
    # row 0: 1.28 A+ (clipped) + A+;  row 1: 0.8 A- (clipped) + A-;  row 2: A-;  row 3: 1.3 A- + A-
    J = (2.28 * A_POS + 1.8 * A_NEG + A_NEG + 2.3 * A_NEG) / 7
    assert loss == pytest.approx(-J, abs=1e-12)
    assert grad[0, 0].item() == 0.0 and grad[2, 0].item() == pytest.approx(-A_NEG / 7, abs=1e-12)


def test_ppo_with_gae_and_value_loss() -> None:
    """One response of 3 tokens, reward 1 at the end, V = (0.5, 0.2, 0.4), gamma 0.9, lambda 0.8:
    delta = (-0.32, 0.16, 0.6), A = (0.10624, 0.592, 0.6), returns A + V = (0.60624, 0.792, 1.0)
    (whitening switched off: gae(0.9, 0.8, 0))."""
    spec = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("gae", (0.9, 0.8, 0.0)))
    settings = Settings(critic=CriticSettings(value_clip=0.2, coef=0.5))
    prog = compile_spec(spec, settings)
    old = torch.full((1, 3), math.log(0.5), dtype=D)
    lp = (old + torch.tensor([[1.0, 1.3, 0.7]], dtype=D).log()).requires_grad_()
    v_old = torch.tensor([[0.5, 0.2, 0.4]], dtype=D)
    prep = prog.prepare(
        response_mask=torch.ones(1, 3, dtype=torch.bool),
        rewards=torch.tensor([1.0], dtype=D),
        old_logprobs=old,
        values=v_old,
    )
    torch.testing.assert_close(
        prep.adv[0], torch.tensor([[0.10624, 0.592, 0.6]], dtype=D), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        prep.returns, torch.tensor([[0.60624, 0.792, 1.0]], dtype=D), rtol=0, atol=1e-12
    )
    v_new = torch.tensor([[0.6, 0.5, 0.9]], dtype=D, requires_grad=True)
    out = prog.loss(prep, logprobs=lp, values=v_new)
    # min(r A, clip(r) A): 0.10624;  1.2 * 0.592 (clipped);  min(0.7, 0.8) * 0.6 = 0.42
    assert out.loss.item() == pytest.approx(-(0.10624 + 0.7104 + 0.42) / 3, abs=1e-12)
    # value: max((v - G)^2, (v_old + clip(v - v_old, -0.2, 0.2) - G)^2) per token, halved, token mean, * 0.5
    per_token = [(0.6 - 0.60624) ** 2, max((0.5 - 0.792) ** 2, (0.4 - 0.792) ** 2), max(0.1**2, 0.4**2)]
    assert out.value_loss.item() == pytest.approx(0.5 * 0.5 * sum(per_token) / 3, abs=1e-12)


def test_gspo() -> None:
    """s_i = (pi_theta / pi_old)^(1/|y_i|) (geometric mean of the token ratios);
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - e, 1 + e) A_i)."""
    old = torch.full((2, 2), -1.0, dtype=D)
    log_ratio = torch.tensor([[0.2, 0.0], [-0.3, 0.1]], dtype=D)
    kw = dict(
        logprobs=(old + log_ratio).requires_grad_(),
        old_logprobs=old,
        rewards=torch.tensor([1.0, 0.0], dtype=D),
        group_ids=torch.zeros(2, dtype=torch.long),
        response_mask=torch.ones(2, 2, dtype=torch.bool),
    )
    a = 0.5 / (math.sqrt(0.5) + EPS)
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    wide = EstimatorSpec(
        mask=Call("seq_clip", (0.2, 0.2)),
        denom="pi_old_seq",
        adv=Call("group_norm"),
        agg=Call("seq_mean_token_mean"),
    )
    loss, grad, _ = loss_and_grad(wide, kw)
    assert loss == pytest.approx(-(s0 * a - s1 * a) / 2, abs=1e-12)
    # d s_i / d log pi(y_t) = s_i / |y_i|
    expected = torch.tensor([[-a * s0 / 4] * 2, [a * s1 / 4] * 2], dtype=D)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    kw["logprobs"] = kw["logprobs"].detach().requires_grad_()
    narrow = EstimatorSpec(
        mask=Call("seq_clip", (0.05, 0.05)),
        denom="pi_old_seq",
        adv=Call("group_norm"),
        agg=Call("seq_mean_token_mean"),
    )
    loss, grad, _ = loss_and_grad(narrow, kw)
    assert loss == pytest.approx(-(1.05 * a - 0.95 * a) / 2, abs=1e-12)
    assert not grad.any()  # both sequences are clipped as a whole


def test_luffy_shaped_off_policy() -> None:
    """One group of 3 rollouts (1, 0, 0) and a demonstration (reward 1): advantages over all four,
    A_demo = 0.5 / (sqrt(1/3) + eps). Off-policy loss on the demonstration tokens with
    pi = (0.5, 0.1): -A * mean_t f(pi_t), f(x) = x / (x + 0.1); d/dlog pi = -A/2 * 0.1 pi / (pi + 0.1)^2."""
    spec = EstimatorSpec(
        denom="1", grad=Call("shaped", (0.1,)), adv=Call("group_norm"), on="demos", group="rollouts+demos"
    )
    lp = torch.log(torch.tensor([[0.3, 0.3], [0.3, 0.3], [0.3, 0.3], [0.5, 0.1]], dtype=D)).requires_grad_()
    kw = dict(
        logprobs=lp,
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D),
        group_ids=torch.zeros(4, dtype=torch.long),
        is_demo=torch.tensor([False, False, False, True]),
        response_mask=torch.ones(4, 2, dtype=torch.bool),
    )
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    loss, grad, _ = loss_and_grad(spec, kw)
    assert loss == pytest.approx(-a * (0.5 / 0.6 + 0.1 / 0.2) / 2, abs=1e-12)
    expected = torch.zeros(4, 2, dtype=D)
    expected[3] = torch.tensor([-a / 2 * 0.05 / 0.36, -a / 2 * 0.01 / 0.04], dtype=D)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name, value, slope",
    [
        ("k1", math.log(2), 1.0),  # log pi - log ref
        ("k2", 0.5 * math.log(2) ** 2, math.log(2)),  # (log pi - log ref)^2 / 2
        ("k3", 0.5 + math.log(2) - 1, 0.5),  # ref/pi - log(ref/pi) - 1;  d/dlog pi = 1 - ref/pi
    ],
)
def test_kl_estimators(name: str, value: float, slope: float) -> None:
    """pi = 0.5, pi_ref = 0.25, coefficient 2, advantage 0: the loss is 2 * KL estimate."""
    spec = EstimatorSpec(adv=Call("const", (0.0,)), kl=Call(name, (2.0,)))
    lp = torch.tensor([[math.log(0.5)]], dtype=D, requires_grad=True)
    kw = dict(
        logprobs=lp,
        ref_logprobs=torch.tensor([[math.log(0.25)]], dtype=D),
        response_mask=torch.ones(1, 1, dtype=bool),
    )
    loss, grad, out = loss_and_grad(spec, kw)
    assert loss == pytest.approx(2 * value, abs=1e-12)
    assert float(out.metrics["kl"]) == pytest.approx(value, abs=1e-12)
    assert grad.item() == pytest.approx(2 * slope, abs=1e-12)


def test_rloo_and_reinforce_pp_advantages() -> None:
    """RLOO: A_i = R_i - mean of the other n - 1 rewards; REINFORCE++: batch whitening."""
    kw = four_rollouts()
    prog = compile_spec(EstimatorSpec(denom="pi_old", adv=Call("rloo")))
    prep = prog.prepare(
        response_mask=kw["response_mask"],
        rewards=kw["rewards"],
        group_ids=kw["group_ids"],
        old_logprobs=kw["old_logprobs"],
    )
    torch.testing.assert_close(prep.adv[0][:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=D))
    prog = compile_spec(EstimatorSpec(denom="pi_old", adv=Call("batch_norm")))
    two_questions = torch.tensor([0, 0, 1, 1])
    prep = prog.prepare(
        response_mask=kw["response_mask"],
        rewards=kw["rewards"],
        group_ids=two_questions,
        old_logprobs=kw["old_logprobs"],
    )
    torch.testing.assert_close(prep.adv[0][:, 0], torch.tensor([A_POS, A_NEG, A_NEG, A_NEG], dtype=D))
