"""The learners' memory features give the plain path's updates: activation checkpointing
(``learner.gradient_checkpointing``, policy and critic) and token-budget micro-batches
(``train.micro_batch_tokens``); with DeepSpeed at ZeRO-3 over two processes, the fused
log-prob path, checkpointing and token budgets together give the plain torch learner's
parameters (ranks then run different numbers of micro-batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_deepspeed_learner import UPDATES, local_batch, make_batch, max_diff, train_step
from test_engine_learner import HPT, _batch, _learner, _prepare, base  # noqa: F401

from hpt_dsl import dist
from hpt_dsl.batch import TrainBatch
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import load_recipe  # type: ignore[attr-defined]
from hpt_dsl.models import build_tiny, load_local

PPO = "loss = ppo\ncritic { lr = 1e-2 }"


def padded_tokens(host: TrainBatch, rows: torch.Tensor) -> int:
    """The tokens a micro-batch of ``rows`` is trimmed to: rows x (prompt width + response width)."""
    p = int(host.prompt_mask[rows].sum(1).max())
    r = max(1, int(host.response_mask[rows].sum(1).max()))
    return len(rows) * (p + r)


@pytest.mark.parametrize(("budget", "cap"), [(40, 64), (40, 3), (60, 64), (5, 64)])
def test_token_budget_packs_rows_sorted_by_length(base: tuple[Any, Any], budget: int, cap: int) -> None:  # noqa: F811
    """Every row once, longest first; each micro-batch within the budget (or one row alone) and
    within train.micro_batch rows; each one ends only where the next row would not fit."""
    learner, _, _ = _learner(base, HPT, f"train.micro_batch_tokens={budget}", f"train.micro_batch={cap}")
    host = _batch(questions=4, n=4)
    rows = torch.arange(len(host))
    chunks = learner._micro_batches(host, rows)
    order = torch.cat(chunks)
    assert sorted(order.tolist()) == rows.tolist()
    lengths = (host.prompt_mask.sum(1) + host.response_mask.sum(1))[order]
    assert torch.all(lengths[:-1] >= lengths[1:])
    for i, c in enumerate(chunks):
        assert len(c) <= cap and (len(c) == 1 or padded_tokens(host, c) <= budget)
        if i + 1 < len(chunks):  # the next row did not fit
            grown = torch.cat([c, chunks[i + 1][:1]])
            assert len(grown) > cap or padded_tokens(host, grown) > budget
    if budget == 5:  # every row is longer than the budget: each alone
        assert all(len(c) == 1 for c in chunks)
    else:
        assert 1 < len(chunks) < len(rows)


def _update_params(base: tuple[Any, Any], text: str, *sets: str, updates: int = 2) -> tuple[list, list, Any]:  # noqa: F811
    """Policy and critic parameters after ``updates`` updates (with pi_old and values passes),
    and the learner."""
    learner, program, _ = _learner(base, text, "train.lr=0.0005", *sets)
    for seed in range(updates):
        batch = _batch(seed)
        values = learner.values(batch) if learner.critic is not None else None
        old = learner.logprobs(batch)
        prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
                               is_demo=batch.is_demo, old_logprobs=old, values=values)  # fmt: skip
        assert not learner.update(batch, program, prep).skipped
    policy = [p.detach().clone() for p in learner.model.parameters()]
    critic = [] if learner.critic is None else [p.detach().clone() for p in learner.critic.parameters()]
    return policy, critic, learner


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """float32 noise only (AdamW's first steps move a near-0 gradient's weight by up to lr)."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, rtol=1e-5, atol=5e-6)


def test_token_budget_update_equals_the_plain_update(base: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """HPT with a token budget of 30 (more, smaller micro-batches) against 64 rows at once."""
    from hpt_dsl.learner.torch import TorchLearner

    counts: list[int] = []
    real = TorchLearner._micro_batches
    monkeypatch.setattr(TorchLearner, "_micro_batches",
                        lambda self, host, rows: counts.append(len(c := real(self, host, rows))) or c)  # fmt: skip
    budget, _, _ = _update_params(base, HPT, "train.micro_batch_tokens=30")
    many = max(counts)
    counts.clear()
    plain, _, _ = _update_params(base, HPT)
    assert many > max(counts) == 1
    _assert_same(budget, plain)
    assert any(not torch.equal(x, y) for x, y in zip(plain, base[0].parameters(), strict=True))


def test_gradient_checkpointing_update_equals_the_plain_update(base: tuple[Any, Any]) -> None:  # noqa: F811
    """PPO (policy and critic): with checkpointing every decoder layer runs again in the backward
    pass, and the parameters after two updates are the plain ones."""
    calls: dict[str, list[int]] = {}
    out = {}
    for on in ("true", "false"):
        learner, _, _ = _learner(base, PPO, f"learner.gradient_checkpointing={on}")
        assert learner.model.is_gradient_checkpointing == (on == "true")
        assert learner.critic is not None and learner.critic.body.is_gradient_checkpointing == (on == "true")
        out[on] = _update_params(base, PPO, f"learner.gradient_checkpointing={on}", updates=2)
        policy_learner = out[on][2]
        calls[on] = []
        for model in (policy_learner.model, policy_learner.critic.body):
            layer = model.layers[0] if hasattr(model, "layers") else model.model.layers[0]
            layer.register_forward_pre_hook(lambda *a, seen=calls[on]: seen.append(1))  # the recompute stops early
        batch = _batch(5)
        program = compile_recipe(load_recipe(text=PPO))
        prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
                               is_demo=batch.is_demo, old_logprobs=policy_learner.logprobs(batch),
                               values=policy_learner.values(batch))  # fmt: skip
        calls[on].clear()
        policy_learner.update(batch, program, prep)
    # plain: the policy's shared prompt and response passes and the critic's; checkpointed: one policy
    # pass (no prompt sharing: a checkpointed layer keeps no cache) and the critic's, each run again in backward
    assert calls["false"] == [1, 1, 1] and calls["true"] == [1, 1, 1, 1]
    _assert_same(out["true"][0], out["false"][0])
    _assert_same(out["true"][1], out["false"][1])


# ----- DeepSpeed: ZeRO-3 over two processes ---------------------------------------------------------

DS_RECIPE = """
loss = if acc > 0.3 then grpo kl=k3(0.05) else sft
train { micro_batch = 3  lr = 0.0005  grad_clip = 0.5  schedule = "warmup"  warmup_steps = 2 }
"""
FEATURES = ("learner.fused_logprob=true", "learner.gradient_checkpointing=true", "train.micro_batch_tokens=40")


def _ds_worker(model_dir: str, out_dir: str) -> None:
    """ZeRO-3 with every memory feature on: the policy's no-grad log-probs and 3 updates."""
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    torch.manual_seed(0)
    model, tokenizer = load_local(Path(model_dir))
    r = load_recipe(text=DS_RECIPE, overrides=["learner.engine=deepspeed", "learner.zero_stage=3", *FEATURES])
    learner = DeepSpeedLearner(r, model, tokenizer)
    program = compile_recipe(r)
    out: dict[str, Any] = {"head": learner._head(learner.engine) is not None}
    passes: list[int] = []
    real = learner._micro_batches
    learner._micro_batches = lambda host, rows: passes.append(len(c := real(host, rows))) or c  # type: ignore[method-assign]
    for step in range(UPDATES):
        batch = local_batch(make_batch(step))
        out[f"logprobs/{step}"] = learner.logprobs(batch)
        out[f"metrics/{step}"] = train_step(learner, program, batch, step)
    out["passes"] = torch.tensor(passes)
    out["params"] = learner.full_state_dict()
    learner.close()
    torch.save(out, Path(out_dir) / f"rank{dist.rank()}.pt")


@pytest.mark.slow
def test_zero3_with_fused_path_checkpointing_and_token_budget_equals_the_plain_learner(tmp_path: Path) -> None:
    from hpt_dsl.learner.torch import TorchLearner

    model_dir = build_tiny(tmp_path / "model", seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_local(model_dir)
    r = load_recipe(text=DS_RECIPE, overrides=["learner.fused_logprob=false"])
    plain = TorchLearner(r, model, tokenizer)
    program = compile_recipe(r)
    expected: dict[str, Any] = {}
    for step in range(UPDATES):
        batch = make_batch(step)
        expected[f"logprobs/{step}"] = plain.logprobs(batch)
        expected[f"metrics/{step}"] = train_step(plain, program, batch, step)
    dist.spawn(_ds_worker, 2, str(model_dir), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert all(r["head"] for r in ranks)
    assert not torch.equal(ranks[0]["passes"], ranks[1]["passes"])  # the ranks' micro-batch counts differ
    params = {k: v for k, v in plain.model.state_dict().items()}
    assert max_diff(ranks[0]["params"], params) < 1e-5
    for step in range(UPDATES):
        for key in ("loss", "grad_norm", "rows_used", "tokens"):
            assert ranks[0][f"metrics/{step}"][key] == pytest.approx(expected[f"metrics/{step}"][key], rel=1e-4,
                                                                     abs=1e-6)  # fmt: skip
        whole = make_batch(step)
        for i, rank in enumerate(ranks):  # each rank's rows: the plain learner's log-probs of the same rows
            mine = torch.isin(whole.group_ids, torch.tensor(list(dist.shard(4, i, 2))))
            got = rank[f"logprobs/{step}"]
            torch.testing.assert_close(got, expected[f"logprobs/{step}"][mine][:, : got.shape[1]], rtol=0,
                                       atol=1e-5)  # fmt: skip

