"""hpt_dsl.integrations.verl against verl's own core_algos (the integrations environment:
scripts/setup-integrations; skipped where verl is not installed).

verl's built-in "vanilla" policy loss is dual-clip PPO (clip_ratio_c = 3 on negative
advantages): the recipe ``mask=dual_clip(lo, hi, 3) denom=pi_old grad=loglik agg=<agg>``,
registered under a name, must give the same loss and gradient from ``get_policy_loss_fn`` on
random float64 batches, for each ``loss_agg_mode``, on one micro-batch and on micro-batches
normalised over the mini-batch through ``config.global_batch_info``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

from hpt_dsl.integrations.common import IntegrationError  # noqa: E402
from hpt_dsl.integrations.verl import register  # noqa: E402

B, T = 9, 7
LO, HI = 0.2, 0.28
AGGS = {
    "token-mean": "token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum-norm": f"token_sum_norm({T})",
}
_names = itertools.count()


def recipe(agg: str, adv: str = "group_norm") -> str:
    return f"mask=dual_clip({LO}, {HI}, 3) denom=pi_old adv={adv} grad=loglik agg={agg}"


def actor_config() -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp", clip_ratio=LO, clip_ratio_low=LO, clip_ratio_high=HI,
                           ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=4, rollout_n=1)  # fmt: skip


def batch(seed: int) -> dict[str, torch.Tensor]:
    """Random rows: lengths 0..T (one empty row), ratios far enough from 1 that both clips and
    the dual clip act, per-token advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    new = old + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return {"old": old, "new": new, "adv": adv, "mask": mask}


def run(fn: object, b: dict[str, torch.Tensor], mode: str, rows: slice, info: dict) -> tuple[torch.Tensor, dict]:
    cfg = actor_config()
    cfg.global_batch_info.update(info)
    new = b["new"][rows].clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=b["old"][rows], log_prob=new, advantages=b["adv"][rows],  # type: ignore[operator]
                       response_mask=b["mask"][rows], loss_agg_mode=mode, config=cfg)  # fmt: skip
    loss.backward()
    return torch.cat([loss.detach().reshape(1), new.grad.reshape(-1)]), metrics


@pytest.mark.parametrize("mode", list(AGGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_vanilla_on_one_micro_batch(mode: str, seed: int) -> None:
    name = register(recipe(AGGS[mode]), name=f"hpt_vanilla_{next(_names)}")
    ours_fn, theirs_fn = core_algos.get_policy_loss_fn(name), core_algos.get_policy_loss_fn("vanilla")
    b = batch(seed)
    ours, metrics = run(ours_fn, b, mode, slice(None), {})
    theirs, their_metrics = run(theirs_fn, b, mode, slice(None), {})
    assert theirs[1:].abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)
    assert metrics["actor/pg_clipfrac"] > 0  # the clip acts on these batches
    assert metrics["actor/ppo_kl"] == pytest.approx(their_metrics["actor/ppo_kl"], rel=1e-9)


@pytest.mark.parametrize("mode", list(AGGS))
def test_equals_vanilla_over_micro_batches(mode: str) -> None:
    """Two micro-batches normalised by the mini-batch's counts (verl's global_batch_info)."""
    name = register(recipe(AGGS[mode]), name=f"hpt_vanilla_{next(_names)}")
    b = batch(7)
    mask = b["mask"]
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": int((mask.sum(-1) > 0).sum()),
            "loss_scale_factor": None}  # fmt: skip
    for rows in (slice(0, 4), slice(4, B)):
        ours, _ = run(core_algos.get_policy_loss_fn(name), b, mode, rows, info)
        theirs, _ = run(core_algos.get_policy_loss_fn("vanilla"), b, mode, rows, info)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    "adv,verl_fn,kw",
    [
        ("group_norm", core_algos.compute_grpo_outcome_advantage, {"norm_adv_by_std_in_grpo": True}),
        ("group_mean", core_algos.compute_grpo_outcome_advantage, {"norm_adv_by_std_in_grpo": False}),
        ("rloo", core_algos.compute_rloo_outcome_advantage, {}),
    ],
)
def test_advantage_estimator_equals_verl(adv: str, verl_fn: object, kw: dict) -> None:
    name = register(recipe("token_mean", adv), name=f"hpt_adv_{next(_names)}")
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (12,), generator=g)[:, None]).to(torch.float64)
    scores = torch.randint(0, 2, (12,), generator=g).to(torch.float64) + torch.rand(12, generator=g,
                                                                                    dtype=torch.float64)  # fmt: skip
    last = mask.sum(-1).long() - 1
    rewards = torch.zeros(12, T, dtype=torch.float64)
    rewards[torch.arange(12), last] = scores
    index = np.array(["q-b", "q-a", "q-c"] * 4, dtype=object)
    ours, _ = core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=index)
    theirs, _ = verl_fn(token_level_rewards=rewards, response_mask=mask, index=index, **kw)  # type: ignore[operator]
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "text,match",
    [
        ("loss = if acc > 0 then grpo else 0", "per-question statistics"),
        ("hpt", "demonstrations"),
        (recipe("token_mean") + " kl=k3(0.01)", "use_kl_loss"),
        ("loss = grpo + 0.5 * dapo", "aggregate differently"),
    ],
)
def test_unmappable_recipes_are_refused(text: str, match: str) -> None:
    with pytest.raises(IntegrationError, match=match):
        register(text, name=f"hpt_bad_{next(_names)}")


def test_agg_mode_must_match_the_recipe() -> None:
    name = register(recipe("token_mean"), name=f"hpt_vanilla_{next(_names)}")
    with pytest.raises(IntegrationError, match="loss_agg_mode=token-mean"):
        run(core_algos.get_policy_loss_fn(name), batch(0), "seq-mean-token-mean", slice(None), {})


def test_verl_imports_the_registration_in_every_process(tmp_path: Path) -> None:
    """verl imports the modules named in VERL_USE_EXTERNAL_MODULES on ``import verl`` (driver
    and Ray workers alike): a module that calls ``register`` makes the name known there."""
    (tmp_path / "my_losses.py").write_text(
        "from hpt_dsl.integrations.verl import register\n"
        f"register({recipe('token_mean')!r}, name='hpt_env')\n"
    )
    check = ("from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
             "print(get_policy_loss_fn('hpt_env').__name__, get_adv_estimator_fn('hpt_env').__name__)")  # fmt: skip
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "my_losses", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["hpt_policy_loss", "hpt_advantage"]
