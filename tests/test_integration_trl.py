"""hpt_dsl.integrations.trl against TRL itself (the integrations environment:
scripts/setup-integrations; skipped where TRL is not installed).

Equality: on one generation batch of the built-in tiny model, TRL's own ``GRPOTrainer`` with
``loss_type`` grpo, dr_grpo or dapo and ``HptGRPOTrainer`` with the recipe line that writes
the same estimator give the same loss and the same gradient. The batch is sampled once and
both trainers compute the loss on it from identical weights. ``num_iterations=2`` makes TRL
keep the sampling policy's log-probs, and the weights are then moved, so that ratios differ
from 1 and clipping is exercised (checked through the recipe's ``clip_frac``).

TRL standardises advantages with (R - mean) / (std + 1e-4), hpt-dsl's ``group_norm`` with
(R - mean) / (std + 1e-6). The rewards are spread over about 1e4 so that the two epsilons
differ by ~1e-8 relative, below float32 tolerance; with ``scale_rewards="none"`` (Dr. GRPO's
setting) TRL's advantages are R - mean and ``adv=group_mean`` is exact.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hpt_dsl.integrations.common import IntegrationError  # noqa: E402
from hpt_dsl.integrations.trl import HptGRPOTrainer  # noqa: E402
from hpt_dsl.models import build_tiny  # noqa: E402

MAX_LEN = 8
N = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def dataset() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}"}]} for a, b in
                              [(1, 2), (3, 4), (12, 7), (5, 5)]])  # fmt: skip


def spread_reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """A reward spread over ~1e4 that varies inside each group."""
    return [1e4 * ((sum(ids) * 7 + len(ids)) % 11) for ids in completion_ids]


def digit_reward(completions: list[Any], **_: Any) -> list[float]:
    """1 when the completion holds a digit, else 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def config(tmp: Path, **kw: Any) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp), use_cpu=True, bf16=False, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, num_generations=N, max_completion_length=MAX_LEN, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-2, logging_steps=1,
        dataloader_num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return GRPOConfig(**base)


def trainer(cls: type, tiny: Path, cfg: GRPOConfig, reward: Any, **kw: Any) -> Any:
    return cls(
        model=AutoModelForCausalLM.from_pretrained(tiny), reward_funcs=reward, args=cfg,
        train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny), **kw,
    )  # fmt: skip


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    ("grpo", "group", "mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=seq_mean_token_mean"),
    ("dr_grpo", "group", f"mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=token_sum_norm({MAX_LEN})"),
    ("dr_grpo", "none", f"mask=clip(0.2) denom=pi_old adv=group_mean grad=loglik agg=token_sum_norm({MAX_LEN})"),
    ("dapo", "group", "mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=token_mean"),
    ("grpo", "none", "mask=clip(0.2) denom=pi_old adv=group_mean grad=loglik agg=seq_mean_token_mean"),
]


@pytest.mark.parametrize("loss_type,scale,recipe", CASES)
def test_loss_and_gradient_equal_trl(tiny: Path, tmp_path: Path, loss_type: str, scale: str, recipe: str) -> None:
    cfg = config(tmp_path, loss_type=loss_type, scale_rewards=scale, num_iterations=2)
    ours = trainer(HptGRPOTrainer, tiny, cfg, spread_reward, recipe=recipe)
    theirs = trainer(GRPOTrainer, tiny, cfg, spread_reward)
    theirs.model.load_state_dict(ours.model.state_dict())
    for t in (ours, theirs):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    assert "old_per_token_logps" in inputs  # num_iterations=2: sampled under the old policy
    with torch.no_grad():  # move the policy away from the sampling one, identically in both
        gen = torch.Generator().manual_seed(1)
        noise = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in ours.model.named_parameters()}
        for model in (ours.model, theirs.model):
            for n, p in model.named_parameters():
                p.add_(noise[n])
    loss_ours = ours.compute_loss(ours.model, copy.copy(inputs))
    loss_theirs = theirs.compute_loss(theirs.model, copy.copy(inputs))
    loss_ours.backward()
    loss_theirs.backward()
    assert math.isclose(loss_ours.item(), loss_theirs.item(), rel_tol=1e-5, abs_tol=1e-3), (loss_ours, loss_theirs)
    g_ours, g_theirs = grads(ours.model), grads(theirs.model)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    scale_g = max(g.abs().max().item() for g in g_theirs.values())
    assert scale_g > 0
    worst = max((g_ours[n] - g_theirs[n]).abs().max().item() for n in g_ours)
    assert worst <= 1e-5 * scale_g, (worst, scale_g)
    clip = ours._metrics["train"]["hpt/clip_frac"]
    assert clip and clip[-1] > 0  # the moved policy has clipped tokens: the clip is exercised


def test_trains_three_steps_with_a_gated_recipe(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    t = trainer(HptGRPOTrainer, tiny, cfg, digit_reward,
                recipe="loss = if acc > 0 then grpo else 0.1 * dapo")  # fmt: skip
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert t.state.global_step == 3
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in t.model.named_parameters())
    assert moved > 0
    logs = [h for h in t.state.log_history if "hpt/loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["hpt/loss"])
        assert 0.0 <= h["hpt/branch/acc > 0"] <= 1.0
        assert math.isclose(h["hpt/branch/acc > 0"] + h["hpt/branch/else"], 1.0, abs_tol=1e-6)


def test_demonstrations_are_refused_before_loading(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(IntegrationError, match="demonstrations"):
        HptGRPOTrainer(model=str(tiny), reward_funcs=digit_reward, args=config(tmp_path), recipe="hpt")


def test_kl_term_needs_beta(tiny: Path, tmp_path: Path) -> None:
    recipe = "mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=token_mean kl=k3(0.04)"
    with pytest.raises(IntegrationError, match="beta"):
        trainer(HptGRPOTrainer, tiny, config(tmp_path), digit_reward, recipe=recipe)
