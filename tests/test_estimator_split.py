"""Split invariance: the loss, its gradient and its metrics, summed over any split of the
mini-batch into micro-batches, equal the full-batch values (normalisers are global)."""

from __future__ import annotations

import pytest
import torch

from hpt_dsl.estimator import compile_loss
from hpt_dsl.recipe import Call, Compare, Const, EstimatorSpec, Gate, Stat, Sum, Term
from hpt_dsl.settings import CriticSettings, RolloutSettings, Settings

AGGS = [
    Call("token_mean"),
    Call("seq_mean_token_mean"),
    Call("seq_mean_token_sum"),
    Call("token_sum_norm", (16.0,)),
]


def batch(seed: int, B: int = 24, T: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(B) // 6
    demo = torch.arange(B) % 6 == 5
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    return dict(
        response_mask=mask,
        group_ids=gid,
        is_demo=demo,
        rewards=(torch.rand(B, generator=g) < 0.4).double(),
        old_logprobs=old,
        ref_logprobs=old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
        values=torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout_logprobs=old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64),
        lp=old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        entropy=torch.rand(B, T, generator=g, dtype=torch.float64),
    )


def splits(B: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    return [
        [torch.arange(B)],
        list(torch.arange(B).split(1)),
        list(perm.split(5)),
        [perm[:3], perm[3:]],
    ]


def losses(agg: Call) -> Gate:
    grpo = EstimatorSpec(
        mask=Call("clip", (0.2, 0.28)),
        denom="pi_old",
        adv=Call("group_norm"),
        agg=agg,
        kl=Call("k3", (0.1,)),
        entropy=0.01,
        name="grpo",
    )
    sft = EstimatorSpec(on="demos", agg=agg, name="sft")
    ppo = EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("gae", (1.0, 0.95)), agg=agg, name="ppo"
    )
    gspo = EstimatorSpec(
        mask=Call("seq_clip", (0.1, 0.1)), denom="pi_old_seq", adv=Call("group_norm"), agg=agg, name="gspo"
    )
    hard = Compare("<=", Stat("acc"), Const(0.2))
    return Gate(((hard, Term(sft)),), Sum((Term(grpo), Term(ppo), Term(gspo))))


@pytest.mark.parametrize("agg", AGGS, ids=str)
@pytest.mark.parametrize("old_is_current", [False, True])
def test_micro_batches_sum_to_the_full_batch(agg: Call, old_is_current: bool) -> None:
    settings = Settings(critic=CriticSettings(), rollout=RolloutSettings(tis_cap=1.5))
    prog = compile_loss(losses(agg), settings)
    b = batch(1)
    B = b["lp"].shape[0]
    prep = prog.prepare(
        response_mask=b["response_mask"],
        rewards=b["rewards"],
        group_ids=b["group_ids"],
        is_demo=b["is_demo"],
        old_logprobs=None if old_is_current else b["old_logprobs"],
        ref_logprobs=b["ref_logprobs"],
        values=b["values"],
        rollout_logprobs=b["rollout_logprobs"],
        old_is_current=old_is_current,
    )
    reference = None
    for split in splits(B, 3):
        lp = b["lp"].clone().requires_grad_()
        values = b["values"].clone().add(0.1).requires_grad_()
        total, vtotal, metrics = 0.0, 0.0, {}
        for rows in split:
            out = prog.loss(
                prep, logprobs=lp[rows], rows=rows, entropy=b["entropy"][rows], values=values[rows]
            )
            (out.loss + out.value_loss).backward()
            total += float(out.loss.detach())
            vtotal += out.value_loss.item()
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        result = (total, vtotal, lp.grad.clone(), values.grad.clone(), metrics)
        if reference is None:
            reference = result
            assert reference[2].abs().sum() > 0 and reference[3].abs().sum() > 0
            continue
        assert total == pytest.approx(reference[0], abs=1e-12)
        assert vtotal == pytest.approx(reference[1], abs=1e-12)
        torch.testing.assert_close(result[2], reference[2], rtol=0, atol=1e-12)
        torch.testing.assert_close(result[3], reference[3], rtol=0, atol=1e-12)
        assert metrics.keys() == reference[4].keys()
        for k in metrics:
            assert metrics[k] == pytest.approx(reference[4][k], abs=1e-9), k


def test_micro_batches_trimmed_to_their_longest_response() -> None:
    """A learner may drop the padding columns of a micro-batch: the loss is unchanged."""
    prog = compile_loss(losses(Call("seq_mean_token_mean")), Settings(critic=CriticSettings()))
    b = batch(2)
    prep = prog.prepare(
        response_mask=b["response_mask"],
        rewards=b["rewards"],
        group_ids=b["group_ids"],
        is_demo=b["is_demo"],
        old_logprobs=b["old_logprobs"],
        ref_logprobs=b["ref_logprobs"],
        values=b["values"],
    )
    lp = b["lp"].clone().requires_grad_()
    full = prog.loss(prep, logprobs=lp, entropy=b["entropy"])
    full.loss.backward()
    g_full = lp.grad.clone()
    lp.grad = None
    total = 0.0
    for rows in torch.arange(lp.shape[0]).split(4):
        width = max(1, int(b["response_mask"][rows].sum(1).max()))
        out = prog.loss(prep, logprobs=lp[rows, :width], rows=rows, entropy=b["entropy"][rows, :width])
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(full.loss.item(), abs=1e-12)
    torch.testing.assert_close(lp.grad, g_full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="beyond"):
        prog.loss(prep, logprobs=lp[:, :1], entropy=b["entropy"][:, :1])
