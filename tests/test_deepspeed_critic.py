"""PPO with GAE on the DeepSpeed learner: the critic gets its own DeepSpeed engine, and one or
two processes at ZeRO 0, 2 and 3 give the plain learner's policy and critic after 3 updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_deepspeed_learner import STAGES, UPDATES, local_batch, make_batch, max_diff

from hpt_dsl import dist
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import load_recipe  # type: ignore[attr-defined]
from hpt_dsl.models import build_tiny, load_local
from hpt_dsl.recipe import Recipe

pytestmark = pytest.mark.slow

PPO = """
loss = ppo
critic { lr = 0.001 }
train { micro_batch = 3  lr = 0.0001  schedule = "constant" }
"""


def recipe(engine: str, stage: int = 0) -> Recipe:
    return load_recipe(text=PPO, overrides=[f"learner.engine={engine}", f"learner.zero_stage={stage}"])


def ppo_step(learner, program, batch, step: int) -> dict[str, float]:  # noqa: ANN001
    values = learner.values(batch)
    prep = dist.prepare(program, response_mask=batch.response_mask, rewards=batch.rewards,
                        group_ids=batch.group_ids, is_demo=batch.is_demo, values=values, step=step,
                        old_is_current=True)
    result = learner.update(batch, program, prep)
    return {**result.metrics, "grad_norm": result.grad_norm}


def critic_state(learner) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The critic's weights, gathered under ZeRO-3 (collective)."""
    import deepspeed

    out = {}
    for name, p in learner.critic_engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def worker(model_dir: str, out: str) -> None:
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    result: dict[str, object] = {}
    for stage in STAGES:
        torch.manual_seed(0)
        model, tokenizer = load_local(Path(model_dir))
        learner = DeepSpeedLearner(recipe("deepspeed", stage), model, tokenizer)
        program = compile_recipe(recipe("deepspeed", stage))
        for step in range(UPDATES):
            result[f"{stage}/metrics/{step}"] = ppo_step(learner, program, local_batch(make_batch(step)), step)
        result[f"{stage}/policy"] = learner.full_state_dict()
        result[f"{stage}/critic"] = critic_state(learner)
        learner.close()
    if dist.is_main():
        torch.save(result, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from hpt_dsl.learner.torch import TorchLearner

    root = tmp_path_factory.mktemp("ppo")
    model_dir = build_tiny(root / "model", seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_local(model_dir)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = TorchLearner(recipe("torch"), model, tokenizer)
    initial_critic = {k: v.detach().clone() for k, v in plain.critic.named_parameters()}
    program = compile_recipe(recipe("torch"))
    out: dict[str, dict] = {"plain": {}}
    for step in range(UPDATES):
        out["plain"][f"metrics/{step}"] = ppo_step(plain, program, make_batch(step), step)
    out["plain"]["policy"] = {k: v.detach().clone() for k, v in plain.model.state_dict().items()}
    out["plain"]["critic"] = {k: v.detach().clone() for k, v in plain.critic.named_parameters()}
    out["initial"] = {"policy": initial, "critic": initial_critic}
    for world in (1, 2):
        path = root / f"world{world}.pt"
        dist.spawn(worker, world, str(model_dir), str(path))
        out[f"world{world}"] = torch.load(path, weights_only=True)
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_policy_and_critic_match_plain_learner(runs: dict, world: int, stage: int) -> None:
    ds = runs[f"world{world}"]
    for part in ("policy", "critic"):
        # float32: Adam's g / sqrt(v) amplifies rounding differences of tiny gradient entries
        assert max_diff(ds[f"{stage}/{part}"], runs["plain"][part]) < 1e-5, part
        assert max_diff(runs["plain"][part], runs["initial"][part]) > 100e-6, part  # moved 10x the tolerance
    for step in range(UPDATES):
        plain, mine = runs["plain"][f"metrics/{step}"], ds[f"{stage}/metrics/{step}"]
        for key in ("loss", "value_loss", "critic_grad_norm", "grad_norm"):
            assert mine[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), (step, key)
