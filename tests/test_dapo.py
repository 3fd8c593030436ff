"""DAPO's run settings (hpt_dsl.sampling): overlong reward shaping at its boundaries, dynamic
sampling (only groups whose rewards differ are trained on, the drawn groups are logged, the
cap on rounds), and the masking of truncated responses (no loss, no gradient, not counted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hpt_dsl import compile_estimator, load_recipe
from hpt_dsl.batch import TrainBatch, build_train_batch
from hpt_dsl.lang import check
from hpt_dsl.rollout.base import Rollout
from hpt_dsl.sampling import Group, fill_share, flatten, overlong_penalty, round_questions, zero_variance
from hpt_dsl.train import Trainer, run_recipe, step_questions

ROOT = Path(__file__).resolve().parent.parent
DAPO = ROOT / "recipes" / "dapo.hpt"
SMALL = ["train.questions=8", "rollout.n=4", "train.eval_every=0", "train.save_every=0", "data.max_test=4",
         "train.micro_batch=16"]  # fmt: skip


def lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in lines(run_dir) if r["kind"] == "train"]


# ----- overlong reward shaping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (27, 0.0), (28, 0.0), (29, -0.25), (30, -0.5), (31, -0.75), (32, -1.0), (33, -1.0), (100, -1.0)],
)
def test_overlong_penalty_over_the_last_cache_tokens(length: int, expected: float) -> None:
    """L_max = 32, L_cache = 4: 0 up to 28 tokens, ((32 - 4) - |y|) / 4 up to 32, -1 past it."""
    assert overlong_penalty(length, 32, 4) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_factor_and_off() -> None:
    assert overlong_penalty(30, 32, 4, factor=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(40, 32, 4, factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(32, 32, 0) == 0.0  # cache 0: shaping off
    # a cache as long as the budget: the penalty starts at the first token
    assert overlong_penalty(0, 8, 8) == 0.0 and overlong_penalty(1, 8, 8) == pytest.approx(-1 / 8)


# ----- dynamic sampling, without a model ----------------------------------------------------


def group(q: int, scores: list[float]) -> Group:
    return Group(q, [Rollout(0, (1, 2), (0.0, 0.0), "stop") for _ in scores], scores)


def test_zero_variance() -> None:
    assert zero_variance([0.0, 0.0, 0.0]) and zero_variance([1.0, 1.0]) and zero_variance([0.5])
    assert not zero_variance([0.0, 1.0, 0.0]) and not zero_variance([-0.25, 0.0])


def test_fill_share_keeps_the_first_informative_groups_and_drops_the_surplus() -> None:
    rounds = [
        [group(0, [0, 0]), group(1, [0, 1]), group(2, [1, 1])],
        [group(3, [1, 0]), group(4, [1, 0]), group(5, [0, 1])],
    ]
    calls: list[int] = []

    def draw(r: int, need: bool) -> list[Group]:
        assert need
        calls.append(r)
        return rounds[r]

    filled = fill_share(draw, 3, max_rounds=10)
    assert calls == [0, 1]  # it stops as soon as the share is full
    assert [g.question for g in filled.groups] == [1, 3, 4] and filled.trained == 3 and filled.short == 0
    assert (filled.rounds, filled.drawn, filled.dropped, filled.surplus) == (2, 6, 2, 1)
    assert (filled.drawn_rollouts, filled.drawn_correct) == (12, 6)


def test_fill_share_stops_at_the_cap_and_completes_with_zero_variance_groups() -> None:
    filled = fill_share(lambda r, need: [group(10 * r, [0, 0]), group(10 * r + 1, [0, 1])], 2, max_rounds=3)
    assert (filled.rounds, filled.trained, filled.short) == (2, 2, 0)  # one informative group per round
    filled = fill_share(lambda r, need: [group(10 * r, [0, 0]), group(10 * r + 1, [1, 1])], 2, max_rounds=3)
    assert (filled.rounds, filled.drawn, filled.dropped, filled.trained, filled.short) == (3, 6, 6, 0, 2)
    assert [g.question for g in filled.groups] == [0, 1]  # in the order they were drawn


def test_a_full_share_joins_the_rounds_another_process_still_needs() -> None:
    """A round is one sampling call on every process: a process whose share is full keeps
    joining (drawing nothing) while another's is short."""
    calls: list[tuple[int, bool]] = []

    def draw(r: int, need: bool) -> list[Group]:
        calls.append((r, need))
        return [group(r, [0, 1])] if need else []

    filled = fill_share(draw, 1, max_rounds=5, anyone=lambda need: need or len(calls) < 3)
    assert calls == [(0, True), (1, False), (2, False)]
    assert (filled.rounds, filled.drawn, filled.trained, filled.short) == (3, 1, 1, 0)


def test_flatten_renumbers_the_rollouts_by_group() -> None:
    a = Group("a", [Rollout(5, (1,), (0.0,), "stop")] * 2, [0.0, 1.0])
    b = Group("b", [Rollout(2, (3,), (0.0,), "length")], [1.0])
    questions, rollouts, scores = flatten([a, b])
    assert questions == ["a", "b"] and [r.prompt_index for r in rollouts] == [0, 0, 1]
    assert scores == [0.0, 1.0, 1.0] and rollouts[2].finish_reason == "length"


def test_round_questions_are_fresh_and_a_function_of_seed_step_round() -> None:
    first = step_questions(100, 10, 3, seed=7)
    assert round_questions(first, 100, 3, 7, 0) == first
    rounds = [round_questions(first, 100, 3, 7, r) for r in range(4)]
    assert rounds == [round_questions(first, 100, 3, 7, r) for r in range(4)]
    assert len({i for r in rounds for i in r}) == 40  # no question twice in a step while others remain
    assert round_questions(first, 100, 3, 8, 1) != rounds[1] and round_questions(first, 100, 4, 7, 1) != rounds[1]
    small = round_questions(step_questions(12, 10, 0, seed=0), 12, 0, 0, 1)
    assert len(small) == 10 and len(set(small)) == 10  # the 2 unseen questions first, then seen ones


# ----- the settings in the language ---------------------------------------------------------


def test_dapo_recipe_turns_the_settings_on_and_checks_clean() -> None:
    assert check(DAPO) == []
    r = load_recipe(DAPO).settings.rollout
    assert r.dynamic_sampling and r.overlong_cache == 4 and r.overlong_penalty == 1.0 and not r.mask_truncated
    default = load_recipe("loss = dapo").settings.rollout
    assert not default.dynamic_sampling and default.overlong_cache == 0 and not default.mask_truncated


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("loss = reinforce\nrollout { n = 1  dynamic_sampling = true }", "E045", "rollout.n = 1"),
        ("loss = dapo\nrollout { max_new_tokens = 8  overlong_cache = 9 }", "E045", "overlong_cache = 9"),
        ("loss = sft\nrollout { dynamic_sampling = true }", "W032", "no effect"),
        ("loss = sft\nrollout { mask_truncated = true }", "W032", "no effect"),
    ],
)
def test_bad_sampling_settings_are_diagnosed(text: str, code: str, needle: str) -> None:
    found = [d for d in check(text) if d.code == code]
    assert found and needle in found[0].message and found[0].line == 2


# ----- masking truncated responses ----------------------------------------------------------


def test_a_masked_truncated_response_has_no_loss_no_gradient_and_no_count() -> None:
    """DAPO's token mean over a batch of two questions; rollout 2 was cut at the budget and is
    kept out of the loss: its tokens get no gradient and the normaliser counts only the others'
    tokens, while its reward still counts in its group's mean and standard deviation."""
    torch.manual_seed(0)
    lengths = [3, 5, 4, 2, 6, 4]
    rollouts = [Rollout(i // 3, tuple(range(1, n + 1)), (0.0,) * n, "length" if i == 2 else "stop")
                for i, n in enumerate(lengths)]  # fmt: skip
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    batch = build_train_batch([[7, 8], [9]], rollouts, rewards, [None, None], [0.0, 0.0], pad_id=0)
    cut = torch.tensor([r.finish_reason == "length" for r in rollouts])
    masked = batch.exclude(cut)
    assert masked.response_mask[2].sum() == 0 and masked.response_mask.sum() == sum(lengths) - 4

    est = compile_estimator("mask=clip(0.2, 0.28) denom=pi_old adv=group_norm agg=token_mean")
    lp = (-torch.rand(6, 6, dtype=torch.float64)).requires_grad_()
    out = est(logprobs=lp, old_logprobs=lp.detach(), rewards=masked.rewards.double(), group_ids=masked.group_ids,
              response_mask=masked.response_mask.double())  # fmt: skip
    out.loss.backward()
    assert lp.grad is not None and torch.all(lp.grad[2] == 0)

    r = torch.tensor(rewards, dtype=torch.float64)
    adv = torch.empty(6, dtype=torch.float64)
    for g in (slice(0, 3), slice(3, 6)):  # every rollout of the group, the masked one included
        adv[g] = (r[g] - r[g].mean()) / (r[g].std() + 1e-6)
    n_tok = sum(lengths) - lengths[2]
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for i, n in enumerate(lengths):
        if i != 2:
            expected[i, :n] = -adv[i] / n_tok  # d/d logpi of -A * pi/pi_old at pi = pi_old, over N_tok
    torch.testing.assert_close(lp.grad, expected, rtol=0, atol=1e-12)
    assert out.loss.item() == pytest.approx(-(adv * torch.tensor(lengths)).sum().item() / n_tok
                                            + (adv[2] * lengths[2]).item() / n_tok, abs=1e-12)  # fmt: skip


# ----- end to end, on the built-in model and task -------------------------------------------


@pytest.fixture(scope="module")
def start_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in model after SFT, so that it solves part of the questions (a random model
    solves none: every group would have zero variance)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    run_recipe(ROOT / "recipes" / "sft.hpt", overrides=["train.steps=100", "train.eval_every=0", "train.save_every=0",
               "data.max_test=4"], output=out, quiet=True)  # fmt: skip
    return str(out / "final-model")


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TrainBatch, dict[str, Any]]]:
    seen: list[tuple[TrainBatch, dict[str, Any]]] = []
    original = Trainer._batch

    def spy(self: Trainer, step: int) -> tuple[TrainBatch, dict[str, Any]]:
        batch, info = original(self, step)
        seen.append((batch, info))
        return batch, info

    monkeypatch.setattr(Trainer, "_batch", spy)
    return seen


@pytest.mark.slow
def test_dynamic_sampling_trains_only_groups_whose_rewards_differ(
    start_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [*SMALL, f"model.name={start_model}", "train.steps=3", "rollout.overlong_cache=0"]
    seen = record_batches(monkeypatch)
    res = run_recipe(DAPO, overrides=sets, output=tmp_path / "dapo", quiet=True)
    rows = train_rows(res.run_dir)
    assert len(seen) == len(rows) == 3
    trained_groups = 0
    for (batch, _), row in zip(seen, rows, strict=True):
        assert len(batch.group_ids.unique()) == 8  # the step always has train.questions places
        live = batch.response_mask.sum(1) > 0
        for q in batch.group_ids.unique():
            rows_q = batch.group_ids == q
            if live[rows_q].any():
                trained_groups += 1
                r = batch.rewards[rows_q & ~batch.is_demo]
                assert r.max() > r.min()  # a non-zero reward variance in every trained group
        assert row["groups/zero_var"] == 0.0
        assert row["sampling/drawn"] >= 8 and row["sampling/drawn"] % 8 == 0
        assert row["sampling/drawn"] == 8 * row["sampling/rounds"]
        assert row["sampling/drawn"] == row["sampling/dropped"] + row["sampling/surplus"] + 8 - row["sampling/short"]
        assert 0.0 <= row["sampling/acc"] <= 1.0
    assert trained_groups > 0  # not vacuous: the step trained on some groups

    # the same model without dynamic sampling trains on zero-variance groups, and says so
    plain = run_recipe(DAPO, overrides=[*sets, "rollout.dynamic_sampling=false"], output=tmp_path / "plain", quiet=True)
    rows = train_rows(plain.run_dir)
    assert sum(r["groups/zero_var"] for r in rows) > 0 and not any(k.startswith("sampling/") for k in rows[0])


@pytest.mark.slow
def test_the_cap_on_sampling_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From random weights no rollout is right: every group has zero variance, so each step
    runs exactly max_sampling_rounds rounds and trains on nothing."""
    seen = record_batches(monkeypatch)
    sets = [*SMALL, "train.steps=2", "rollout.max_sampling_rounds=3", "rollout.max_new_tokens=12",
            "rollout.overlong_cache=4"]  # fmt: skip
    res = run_recipe(DAPO, overrides=sets, output=tmp_path / "cap", quiet=True)
    for (batch, _), row in zip(seen, train_rows(res.run_dir), strict=True):
        assert row["sampling/rounds"] == 3 and row["sampling/drawn"] == 24 and row["sampling/dropped"] == 24
        assert row["sampling/short"] == 8 and row["sampling/surplus"] == 0
        assert batch.response_mask.sum() == 0 and row["rows_used"] == 0 and row["loss"] == 0.0
        assert len(batch) == 8 * 4  # the places of the step are kept, out of the loss


@pytest.mark.slow
def test_mask_truncated_in_a_run(start_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 24-token budget cuts the longer worked solutions (16 to 28 tokens): exactly those rows
    are out of the loss, the others keep their tokens."""
    seen = record_batches(monkeypatch)
    sets = [*SMALL, f"model.name={start_model}", "train.steps=1", "rollout.dynamic_sampling=false",
            "rollout.overlong_cache=0", "rollout.mask_truncated=true", "rollout.max_new_tokens=24"]  # fmt: skip
    res = run_recipe(DAPO, overrides=sets, output=tmp_path / "mask", quiet=True)
    (batch, _), row = seen[0], train_rows(res.run_dir)[0]
    dead = int((batch.response_mask.sum(1) == 0).sum())
    assert 0 < dead == round(row["truncated"] * 32) < 32
    assert 0 < int(batch.response_mask.sum(1).max()) <= 24


@pytest.mark.slow
def test_dynamic_sampling_in_two_processes(start_model: str, tmp_path: Path) -> None:
    """Each process fills its own share (4 of the 8 questions); the rounds go on while either
    is short (under ZeRO-3 every sampling call is collective, so a full process joins them);
    the step has 8 informative questions, and the counts add up over the processes."""
    sets = [*SMALL, f"model.name={start_model}", "train.steps=2", "learner.engine=deepspeed", "learner.zero_stage=3",
            "train.threads=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hpt_dsl.cli.main", "run",
           str(DAPO), *[f"--set={s}" for s in sets], "-o", str(tmp_path / "two"), "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = train_rows(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["groups/zero_var"] == 0.0 and row["rows"] == 8 * 4
        drawn, rounds = row["sampling/drawn"], row["sampling/rounds"]
        assert drawn % 4 == 0 and 4 * (rounds + 1) <= drawn <= 8 * rounds  # the other process: 1 to `rounds`
        assert drawn == row["sampling/dropped"] + row["sampling/surplus"] + 8 - row["sampling/short"]
