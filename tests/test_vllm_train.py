"""Training runs with ``rollout.engine = vllm``: stock recipes, engine log-probs, resume.

Each run starts a real vLLM engine (the CPU build), samples every step's rollouts with it,
updates the learner and syncs the weights back. These tests run in the vLLM environment
made by scripts/setup-vllm (CI runs them there).
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

if find_spec("vllm") is None:
    pytest.skip("needs vLLM: run in the environment made by scripts/setup-vllm", allow_module_level=True)

from hpt_dsl.train import run_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL = [
    "rollout.engine=vllm",
    "train.questions=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "train.eval_every=0",
    "train.save_every=1",
    "data.max_test=4",
]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("kind") == "train"]


@pytest.mark.slow
def test_grpo_runs_with_the_engine_log_probs_as_pi_old(tmp_path: Path) -> None:
    """rollout.old_logprobs = engine saves the learner's pi_old pass; at top_p = 1 the ratio
    pi_theta / pi_engine at the start of the update is 1 up to kernel differences."""
    overrides = [*SMALL, "train.steps=2", "rollout.old_logprobs=engine"]
    result = run_recipe(RECIPES / "grpo.hpt", overrides=overrides, output=tmp_path / "grpo", quiet=True)
    rows = train_rows(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rows"] >= 16 and r["response_length"] > 0 and math.isfinite(r["loss"])
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["clip_frac"] == 0.0
    assert (result.run_dir / "final-model" / "config.json").exists()


@pytest.mark.slow
def test_hpt_runs_with_vllm_rollouts_and_tis(tmp_path: Path) -> None:
    """The loop feeds the engine's log-probs to the estimator's TIS correction every step;
    at top_p = 1 they match the learner's, so no weight is truncated."""
    overrides = [*SMALL, "train.steps=2", "rollout.tis_cap=2.0"]
    result = run_recipe(RECIPES / "hpt.hpt", overrides=overrides, output=tmp_path / "hpt", quiet=True)
    rows = train_rows(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rows"] >= 16 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["tis/mismatch"] < 1e-4, "engine and learner log-probs must agree at top_p = 1"
        assert r["tis/trunc_frac"] == 0.0
    assert (result.run_dir / "final-model" / "config.json").exists()


@pytest.mark.slow
def test_resume_syncs_the_checkpoint_into_the_engine(tmp_path: Path) -> None:
    """Stopped after step 1 and resumed, a run samples step 2 exactly as an unbroken run: the
    engine got the checkpoint's weights, not the base model's."""
    recipe = RECIPES / "hpt.hpt"  # its SFT branch changes the weights from the first step
    whole = run_recipe(recipe, overrides=[*SMALL, "train.steps=2"], output=tmp_path / "whole", quiet=True)
    broken = tmp_path / "broken"
    run_recipe(recipe, overrides=[*SMALL, "train.steps=1"], output=broken, quiet=True)
    run_recipe(recipe, overrides=[*SMALL, "train.steps=2"], output=broken, resume=True, quiet=True)
    assert all(r["grad_norm"] > 0 for r in train_rows(whole.run_dir)), "every step must move the weights"
    a, b = train_rows(whole.run_dir)[-1], train_rows(broken)[-1]
    assert a["step"] == b["step"] == 2
    for key in ("reward/mean", "response_length", "truncated", "loss", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
