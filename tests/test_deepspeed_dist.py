"""Data parallel without DeepSpeed: sharding, and the global prepare that makes the loss of
two processes (gloo) equal the loss of one, for every normaliser that spans the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpt_dsl import dist
from hpt_dsl.estimator import compile_loss
from hpt_dsl.recipe import Call, Compare, Const, EstimatorSpec, Gate, Stat, Sum, Term
from hpt_dsl.settings import Settings

N_QUESTIONS, N_ROLLOUTS, T = 6, 4, 7

SFT = EstimatorSpec(on="demos", name="sft")
GRPO = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"),
                     agg=Call("seq_mean_token_mean"), name="grpo")
REINFORCE_PP = EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("batch_norm"),
                             kl=Call("k3", (0.05,)), name="rpp")
# HPT's gate, plus a batch-whitened term on every question: token-mean, seq-mean,
# batch mean/std of rewards and question shares all span the whole batch.
LOSS = Sum((Gate(((Compare("<=", Stat("acc"), Const(0.25)), Term(SFT)),), Term(GRPO)), Term(REINFORCE_PP)))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ordered by question: each question's rollouts, then its demonstration."""
    g = torch.Generator().manual_seed(seed)
    rows = N_QUESTIONS * (N_ROLLOUTS + 1)
    group_ids = torch.arange(N_QUESTIONS).repeat_interleave(N_ROLLOUTS + 1)
    is_demo = (torch.arange(rows) % (N_ROLLOUTS + 1)) == N_ROLLOUTS
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = (torch.rand(rows, generator=g) < 0.4).double()
    rewards[is_demo] = 1.0
    return {
        "response_mask": mask,
        "rewards": rewards,
        "group_ids": group_ids,
        "is_demo": is_demo,
        "old_logprobs": -torch.rand(rows, T, generator=g, dtype=torch.float64),
        "ref_logprobs": -torch.rand(rows, T, generator=g, dtype=torch.float64),
        "logprobs": -torch.rand(rows, T, generator=g, dtype=torch.float64),
        # the engine's log-probs of the rollouts (zeros on demonstrations): truncated IS on
        "rollout_logprobs": -torch.rand(rows, T, generator=g, dtype=torch.float64) * (~is_demo[:, None]),
    }


Batch = dict[str, torch.Tensor]


def loss_and_grad(batch: Batch, rows: slice) -> tuple[float, torch.Tensor, dict[str, float]]:
    """This process's share of the loss, its gradient w.r.t. the rows' log-probs, metrics."""
    program = compile_loss(LOSS, Settings.model_validate({"rollout": {"tis_cap": 1.5}}))
    local = {k: v[rows] for k, v in batch.items()}
    lp = local.pop("logprobs")
    width = int(local["response_mask"].sum(1).max())  # trimmed, as the learner's micro-batches are
    local = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in local.items()}
    lp = lp[:, :width].clone().requires_grad_(True)
    prep = dist.prepare(program, step=3, **local)
    out = program.loss(prep, logprobs=lp)
    out.loss.backward()
    metrics = dist.sum_metrics({k: float(v) for k, v in out.metrics.items()})
    grad = torch.zeros(lp.shape[0], T, dtype=torch.float64)
    grad[:, :width] = lp.grad
    return float(dist.all_reduce_sum(out.loss.detach())), grad, metrics


def _worker(out_dir: str) -> None:
    dist.init("gloo")
    batch = make_batch()
    questions = dist.shard(N_QUESTIONS)
    per_q = N_ROLLOUTS + 1
    rows = slice(questions.start * per_q, questions.stop * per_q)
    loss, grad, metrics = loss_and_grad(batch, rows)
    grads, _ = dist.all_gather_rows(grad)
    if dist.is_main():
        torch.save({"loss": loss, "grad": grads, "metrics": metrics}, Path(out_dir) / "two.pt")


def test_shard_blocks_cover_range_in_order() -> None:
    for n in (0, 1, 5, 6, 7, 16):
        for world in (1, 2, 3, 4):
            blocks = [dist.shard(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_one_process_helpers_are_identity() -> None:
    x = torch.arange(5.0)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum(x) is x
    assert dist.all_reduce_max(3) == 3
    assert dist.sum_metrics({"a": 1.5}) == {"a": 1.5}
    gathered, rows = dist.all_gather_rows(x)
    assert gathered is x and rows == [5]


def test_local_rows_knows_every_prepared_field() -> None:
    program = compile_loss(LOSS)
    batch = make_batch()
    batch.pop("logprobs")
    prep = program.prepare(**batch)
    part = dist.local_rows(prep, slice(5, 10), T)
    assert part.batch_size == 5
    assert torch.equal(part.coef[0], prep.coef[0][5:10])
    assert part.stats["acc"].shape == prep.stats["acc"].shape  # per question: kept whole


def test_two_processes_give_the_one_process_loss_and_gradient(tmp_path: Path) -> None:
    batch = make_batch()
    one_loss, one_grad, one_metrics = loss_and_grad(batch, slice(None))
    dist.spawn(_worker, 2, str(tmp_path))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["loss"] == pytest.approx(one_loss, rel=1e-12, abs=1e-12)
    assert torch.allclose(two["grad"], one_grad, rtol=0, atol=1e-12)
    assert one_grad.abs().sum() > 0
    assert set(two["metrics"]) == set(one_metrics)
    assert one_metrics["tis/trunc_frac"] > 0  # the IS weights' metrics are shares of all rollout tokens
    for key, value in one_metrics.items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# The faithful forms: a per-question loss, a joint normaliser and a step-whitened advantage,
# prepared for one optimizer mini-batch (questions 0, 1, 3, 4 of the step) with the whole
# step's whitening moments.
MIXED = "loss = hpt + luffy + reinforce_pp\nrollout.n = 4\n"
MINI_BATCH = (0, 1, 3, 4)


def mixed_loss_and_grad(batch: Batch, rows: slice) -> tuple[float, torch.Tensor]:
    from hpt_dsl import load_recipe
    from hpt_dsl.estimator import compile_recipe

    program = compile_recipe(load_recipe(text=MIXED))
    local = {k: v[rows] for k, v in batch.items() if k not in ("ref_logprobs", "rollout_logprobs")}
    lp = local.pop("logprobs")
    moments = dist.prepare(program, **local).moments  # over the whole step, every process
    keep = torch.isin(local["group_ids"], torch.tensor(MINI_BATCH))
    sub = {k: v[keep] for k, v in local.items()}
    prep = dist.prepare(program, step_moments=moments, **sub)
    lp = lp[keep].clone().requires_grad_(True)
    out = program.loss(prep, logprobs=lp)
    out.loss.backward()
    grad = torch.zeros(len(batch["group_ids"][rows]), T, dtype=torch.float64)
    grad[keep] = lp.grad
    return float(dist.all_reduce_sum(out.loss.detach())), grad


def _mixed_worker(out_dir: str) -> None:
    dist.init("gloo")
    batch = make_batch(1)
    questions = dist.shard(N_QUESTIONS)
    per_q = N_ROLLOUTS + 1
    loss, grad = mixed_loss_and_grad(batch, slice(questions.start * per_q, questions.stop * per_q))
    grads, _ = dist.all_gather_rows(grad)
    if dist.is_main():
        torch.save({"loss": loss, "grad": grads}, Path(out_dir) / "mixed.pt")


def test_two_processes_give_the_faithful_forms_one_process_values(tmp_path: Path) -> None:
    """per_question counts, joint counts, Q and the step's whitening moments are global."""
    batch = make_batch(1)
    one_loss, one_grad = mixed_loss_and_grad(batch, slice(None))
    dist.spawn(_mixed_worker, 2, str(tmp_path))
    two = torch.load(tmp_path / "mixed.pt", weights_only=True)
    assert one_grad.abs().sum() > 0
    assert two["loss"] == pytest.approx(one_loss, rel=1e-12, abs=1e-12)
    assert torch.allclose(two["grad"], one_grad, rtol=0, atol=1e-12)
