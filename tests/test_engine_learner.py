"""The torch learner: log-probs, one optimizer step, micro-batches, skipped rows, state, critic."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hpt_dsl import models
from hpt_dsl.batch import TrainBatch, build_train_batch, used_rows
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import load_recipe
from hpt_dsl.learner.torch import TorchLearner, lr_lambda
from hpt_dsl.rollout.base import Rollout
from hpt_dsl.settings import TrainSettings


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return models.load_local(models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0))


def _learner(base: tuple[Any, Any], text: str, *sets: str) -> tuple[TorchLearner, Any, Any]:
    model, tok = copy.deepcopy(base[0]), base[1]
    recipe = load_recipe(text=text, overrides=list(sets))
    return TorchLearner(recipe, model, tok), compile_recipe(recipe), recipe


def _batch(seed: int = 0, questions: int = 3, n: int = 4) -> TrainBatch:
    """Rollouts of random tokens, rewards such that question 0 has a correct rollout, the
    others none; every question has a demonstration."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 100, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(questions)]  # fmt: skip
    rollouts, rewards = [], []
    for q in range(questions):
        for j in range(n):
            length = int(torch.randint(1, 7, (1,), generator=g))
            ids = torch.randint(5, 100, (length,), generator=g).tolist()
            rollouts.append(Rollout(q, tuple(ids), tuple([-1.0] * length), "length"))
            rewards.append(1.0 if q == 0 and j == 0 else 0.0)
    demos = [torch.randint(5, 100, (4 + q,), generator=g).tolist() + [2] for q in range(questions)]
    return build_train_batch(prompts, rollouts, rewards, demos, [1.0] * questions, pad_id=0)


def _prepare(program: Any, batch: TrainBatch, **kw: Any) -> Any:
    return program.prepare(
        response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
        is_demo=batch.is_demo, old_is_current=True, **kw,
    )  # fmt: skip


HPT = "loss = if acc > 0 then grpo else sft"


def test_logprobs_are_those_of_each_row_alone(base: tuple[Any, Any]) -> None:
    learner, _, _ = _learner(base, HPT, "rollout.temperature=0.8", "train.micro_batch=4")
    batch = _batch()
    lp = learner.logprobs(batch)
    assert lp.shape == batch.response_ids.shape
    for i in range(len(batch)):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        r = batch.response_ids[i][batch.response_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = learner.model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        expected = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
        assert torch.allclose(lp[i, : len(r)], expected, atol=1e-5)
        assert torch.all(lp[i, len(r) :] == 0)


@pytest.fixture
def exact_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama's RMSNorm computes in float32 even in a float64 model, which rounds gradients
    to float32 precision; here it keeps the input's precision, so float64 comparisons are exact."""
    from transformers.models.llama import modeling_llama

    def forward(self: Any, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _forward_in_float64(learner: TorchLearner, mb: TrainBatch) -> tuple[list[torch.Tensor], int]:
    """(log-probs, entropies, parameter gradients of sum(w * logprob + entropy)), and the number
    of token positions the model's embedding saw."""
    learner.model.double()
    seen: list[int] = []
    emb = learner.model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    lp, ent = learner._logprobs(learner.model, mb, True)
    hook.remove()
    assert ent is not None and lp.dtype == torch.float64
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ((lp * w + ent) * mb.response_mask).sum().backward()
    grads = [p.grad.clone() for p in learner.model.parameters()]  # type: ignore[union-attr]
    return [lp * mb.response_mask, ent * mb.response_mask, *grads], sum(seen)


def test_shared_prompts_give_the_plain_logprobs_entropy_and_gradient(base: tuple[Any, Any], exact_norm: None) -> None:
    """float64: running each of the 3 distinct prompts once for the 15 rows that answer them
    gives the plain forward's log-probs, entropies and parameter gradients, for fewer tokens."""
    batch = _batch(questions=3, n=4)
    mb = batch.select(torch.arange(len(batch)))
    P, T = mb.prompt_ids.shape[1], mb.response_ids.shape[1]
    out = {}
    for share in ("true", "false"):
        learner, _, _ = _learner(base, HPT, "rollout.temperature=0.7", f"learner.share_prompts={share}")
        out[share] = _forward_in_float64(learner, mb)
        assert learner.share_prompts == (share == "true")
    (shared, seen_shared), (plain, seen_plain) = out["true"], out["false"]
    assert seen_plain == 15 * (P + T) and seen_shared == 3 * P + 15 * (T - 1)
    assert shared[0].abs().sum() > 0 and shared[1].abs().sum() > 0
    for a, b in zip(shared, plain, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-11 * max(1.0, b.abs().max().item()))


def test_a_model_without_a_plain_cache_gets_the_plain_forward(
    base: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the prompt pass returns a cache that is not made of plain full-attention layers,
    the learner runs the plain forward for that micro-batch and from then on."""
    from hpt_dsl.learner import prefix

    monkeypatch.setattr(prefix, "plain_cache", lambda cache: False)
    batch = _batch()
    learner, _, _ = _learner(base, HPT)
    assert learner.share_prompts
    lp = learner.logprobs(batch)
    assert not learner.share_prompts
    monkeypatch.undo()
    reference, _, _ = _learner(base, HPT, "learner.share_prompts=false")
    assert torch.equal(lp, reference.logprobs(batch))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_micro_batch_split_gives_the_same_gradient(base: tuple[Any, Any]) -> None:
    """Gradient accumulation over micro-batches of 1 row equals one pass over all rows."""
    grads, norms = [], []
    for mb in (1, 64):
        learner, program, _ = _learner(base, HPT, f"train.micro_batch={mb}")
        seen: list[list[torch.Tensor]] = []

        def capture(learner: TorchLearner = learner, seen: list[list[torch.Tensor]] = seen) -> None:
            seen.append([p.grad.clone() for p in learner.model.parameters()])  # type: ignore[union-attr]

        learner.optimizer.step = capture  # type: ignore[method-assign]
        batch = _batch()
        res = learner.update(batch, program, _prepare(program, batch))
        assert not res.skipped and res.grad_norm > 0 and len(seen) == 1
        grads.append(seen[0])
        norms.append(res.grad_norm)
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_rows_without_weight_are_not_forwarded(base: tuple[Any, Any]) -> None:
    """HPT: question 0 (a correct rollout) trains on its 4 rollouts, questions 1 and 2 on their
    demonstrations only; the other 8 rollouts and question 0's demonstration are skipped."""
    learner, program, _ = _learner(base, HPT, "train.micro_batch=64")
    batch = _batch()
    prep = _prepare(program, batch)
    rows = used_rows(prep)
    demo = batch.is_demo[rows]
    assert sorted(batch.group_ids[rows][~demo].tolist()) == [0, 0, 0, 0]
    assert sorted(batch.group_ids[rows][demo].tolist()) == [1, 2]
    seen: list[int] = []
    hook = learner.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    res = learner.update(batch, program, prep)
    hook.remove()
    assert seen == [3, 6] and res.metrics["rows_used"] == 6  # the 3 distinct prompts once, then 6 rows
    assert res.metrics["gate/sft"] == pytest.approx(2 / 3) and res.metrics["gate/grpo"] == pytest.approx(1 / 3)


def test_non_finite_step_changes_nothing(base: tuple[Any, Any]) -> None:
    learner, program, _ = _learner(base, "loss = sft")
    batch = _batch()
    learner.update(batch, program, _prepare(program, batch))  # optimizer state exists
    before = [p.detach().clone() for p in learner.model.parameters()]
    state = {k: v.clone() for k, v in learner.optimizer.state[next(iter(learner.model.parameters()))].items()}
    lr = learner.scheduler.get_last_lr()
    bad = TrainBatch(**{**batch.__dict__})
    with torch.no_grad():
        learner.model.get_input_embeddings().weight[batch.response_ids[-1, 0]] = float("nan")
    nan_emb = learner.model.get_input_embeddings().weight.detach().clone()
    res = learner.update(bad, program, _prepare(program, bad))
    assert res.skipped and not math.isfinite(res.grad_norm)
    after = list(learner.model.parameters())
    for a, b in zip(before[1:], after[1:], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        after[0],
        nan_emb,
    ) or torch.allclose(after[0], nan_emb, equal_nan=True)
    for k, v in learner.optimizer.state[next(iter(learner.model.parameters()))].items():
        assert torch.equal(v, state[k]), k
    assert learner.scheduler.get_last_lr() == lr
    assert all(p.grad is None for p in learner.model.parameters())


def test_save_and_load_restore_the_exact_state(base: tuple[Any, Any], tmp_path: Path) -> None:
    sets = ("train.schedule=cosine", "train.warmup_steps=2", "train.steps=10")
    a, program, _ = _learner(base, HPT, *sets)
    batch = _batch()
    for _ in range(2):
        a.update(batch, program, _prepare(program, batch))
    a.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"policy.safetensors", "optimizer.safetensors", "scheduler.json"}
    b, _, _ = _learner(base, HPT, *sets)
    b.load(tmp_path)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    other = _batch(seed=1)
    ra = a.update(other, program, _prepare(program, other))
    rb = b.update(other, program, _prepare(program, other))
    assert ra.metrics == rb.metrics
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_schedules() -> None:
    def f(**kw: Any) -> list[float]:
        fn = lr_lambda(TrainSettings(**kw), total_updates=10)
        return [fn(s) for s in range(10)]

    assert f(schedule="constant") == [1.0] * 10
    assert f(schedule="warmup", warmup_steps=4) == [0.25, 0.5, 0.75] + [1.0] * 7
    cos = f(schedule="cosine", warmup_steps=2)
    assert cos[:2] == [0.5, 1.0]
    assert cos[2] == pytest.approx(1.0) and cos[6] == pytest.approx(0.5)
    assert all(x >= y for x, y in zip(cos[2:], cos[3:], strict=False))


def test_reference_model_only_with_a_kl_term(base: tuple[Any, Any]) -> None:
    plain, _, _ = _learner(base, "loss = grpo")
    assert plain.ref is None
    with_kl, _, recipe = _learner(base, "loss = grpo kl=k3(0.04)")
    assert recipe.needs.ref_model and with_kl.ref is not None
    assert not any(p.requires_grad for p in with_kl.ref.parameters())
    batch = _batch()
    # the same weights in another copy: equal up to float32 rounding of the kernels
    assert torch.allclose(with_kl.logprobs(batch, "ref"), with_kl.logprobs(batch, "policy"), rtol=0, atol=1e-5)


def test_critic_for_gae_learns_values(base: tuple[Any, Any]) -> None:
    learner, program, recipe = _learner(base, "loss = ppo\ncritic { lr = 1e-2 }")
    assert recipe.needs.critic and learner.critic is not None
    batch = _batch()
    v0 = learner.values(batch)
    assert v0.shape == batch.response_ids.shape and torch.all(v0 == 0)  # zero-initialised head
    old = learner.logprobs(batch)
    for _ in range(3):
        prep = program.prepare(
            response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
            is_demo=batch.is_demo, old_logprobs=old, values=learner.values(batch),
        )  # fmt: skip
        res = learner.update(batch, program, prep)
        assert not res.skipped and res.metrics["value_loss"] > 0
    v1 = learner.values(batch)
    rollout = ~batch.is_demo
    # the reward is 1 only on row 0: its values move up, the others' towards 0
    assert v1[0, : int(batch.response_mask[0].sum())].mean() > v1[rollout][1:].abs().mean()
