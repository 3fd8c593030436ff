"""``hpt-dsl run`` end to end on the built-in model and task: every shipped recipe, determinism,
resume, a crash during a checkpoint write, Ctrl-C, non-finite steps, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpt_dsl.report import is_timing
from hpt_dsl.train import run_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SMALL = [
    "train.questions=4",
    "rollout.n=2",
    "rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "train.eval_every=2",
    "train.save_every=1",
    "data.max_test=6",
    "train.micro_batch=4",
]
SHIPPED = sorted(  # the recipes for the built-in model (a real model's recipe has its own tests)
    p.name for p in RECIPES.glob("*.hpt") if not re.search(r"^\s*model\b", p.read_text(), re.MULTILINE)
)


def lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics line without its wall-clock figures."""
    return [{k: v for k, v in row.items() if not is_timing(k) and not k.startswith("eval/seconds")
             and k not in ("eval/tokens_per_s", "eval/samples_per_s")} for row in lines(run_dir)]  # fmt: skip


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_runs(name: str, tmp_path: Path) -> None:
    result = run_recipe(RECIPES / name, overrides=[*SMALL, "train.steps=2"], output=tmp_path / "run", quiet=True)
    rows = lines(result.run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    for r in train:
        assert math.isfinite(r["loss"]) and not r["skipped"]
        for key in ("reward/mean", "grad_norm", "time/rollout", "time/reward", "time/logprob", "time/update"):
            assert key in r, key
        assert any(k.startswith("gate/") for k in r)
    assert 0.0 <= evals[-1]["eval/avg@1"] <= 1.0
    final = result.run_dir / "final-model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(final).config.head_dim == 64
    assert AutoTokenizer.from_pretrained(final).eos_token == "<|im_end|>"
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["completed"] is True and info["settings"]["train"]["steps"] == 2
    assert (result.run_dir / "recipe.hpt").read_text() == (RECIPES / name).read_text()


@pytest.mark.slow
def test_ppo_trains_its_critic(tmp_path: Path) -> None:
    result = run_recipe(RECIPES / "ppo.hpt", overrides=[*SMALL, "train.steps=2"], output=tmp_path / "r", quiet=True)
    train = [r for r in lines(result.run_dir) if r["kind"] == "train"]
    # at the start every reward is 0, so returns and values are 0: the value loss is 0 but present
    assert all(math.isfinite(r["value_loss"]) and math.isfinite(r["critic_grad_norm"]) for r in train)
    assert (result.run_dir / "checkpoints" / "step-000002" / "critic.safetensors").exists()


@pytest.mark.slow
def test_pure_sft_samples_no_rollouts_and_grpo_reads_no_demos(tmp_path: Path) -> None:
    sft = run_recipe(RECIPES / "sft.hpt", overrides=[*SMALL, "train.steps=1"], output=tmp_path / "s", quiet=True)
    row = [r for r in lines(sft.run_dir) if r["kind"] == "train"][0]
    assert row["time/rollout"] < 0.5 and row["response_length"] == 0 and row["rows"] == 4
    grpo = run_recipe(RECIPES / "grpo.hpt", overrides=[*SMALL, "train.steps=1"], output=tmp_path / "g", quiet=True)
    row = [r for r in lines(grpo.run_dir) if r["kind"] == "train"][0]
    assert row["demos"] == 0 and row["rows"] == 8


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path: Path) -> None:
    a = run_recipe(RECIPES / "hpt.hpt", overrides=[*SMALL, "train.steps=3"], output=tmp_path / "a", quiet=True)
    b = run_recipe(RECIPES / "hpt.hpt", overrides=[*SMALL, "train.steps=3"], output=tmp_path / "b", quiet=True)
    assert comparable(a.run_dir) == comparable(b.run_dir)
    c = run_recipe(
        RECIPES / "hpt.hpt", overrides=[*SMALL, "train.steps=3", "train.seed=1"], output=tmp_path / "c", quiet=True
    )
    assert comparable(c.run_dir) != comparable(a.run_dir)


@pytest.mark.slow
def test_resume_at_step_k_equals_an_unbroken_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HPT with 2 epochs of 2 mini-batches (so a pi_old pass) and a cosine schedule: stopped by
    Ctrl-C after step 2 and resumed, every later metric is the unbroken run's."""
    from hpt_dsl.train import RunInterrupted, Trainer

    sets = [*SMALL, "train.epochs=2", "train.mini_batches=2", "train.steps=4", "train.save_every=0"]
    whole = run_recipe(RECIPES / "hpt.hpt", overrides=sets, output=tmp_path / "w", quiet=True)
    step = Trainer.train_step

    def ctrl_c_after_step_2(self: Trainer, k: int) -> dict[str, Any]:
        row = step(self, k)
        if k == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C was pressed during step 2
        return row

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_after_step_2)
    broken = tmp_path / "b"
    with pytest.raises(RunInterrupted):
        run_recipe(RECIPES / "hpt.hpt", overrides=sets, output=broken, quiet=True)
    monkeypatch.setattr(Trainer, "train_step", step)
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["step-000002"]
    assert [r["step"] for r in lines(broken) if r["kind"] == "train"] == [1, 2]
    run_recipe(RECIPES / "hpt.hpt", overrides=sets, output=broken, resume=True, quiet=True)
    assert comparable(broken) == comparable(whole.run_dir)


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=4"]]
    crashed = cli("recipes/hpt.hpt", *sets, "-o", str(run), "--quiet", env={"HPT_DSL_FAULT": "checkpoint:3"})
    assert crashed.returncode == 86, crashed.stderr[-2000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".tmp-step-000003", "step-000001", "step-000002"]
    resumed = cli("recipes/hpt.hpt", *sets, "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = run_recipe(RECIPES / "hpt.hpt", overrides=[*SMALL, "train.steps=4"], output=tmp_path / "w", quiet=True)
    assert comparable(run) == comparable(whole.run_dir)
    assert not (run / "checkpoints" / ".tmp-step-000003").exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=200", "train.save_every=0", "train.eval_every=0"]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/hpt.hpt", *sets, "-o", str(run), "--quiet"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and '"kind": "train"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    (ckpt,) = (run / "checkpoints").iterdir()
    done = [r for r in lines(run) if r["kind"] == "train"]
    assert ckpt.name == f"step-{done[-1]['step']:06d}"


@pytest.mark.slow
def test_non_finite_steps_stop_the_run_with_exit_3(tmp_path: Path) -> None:
    """A huge learning rate blows the weights up after the first update: the following steps
    are non-finite, skipped and logged; after train.max_bad_steps the run stops."""
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=6", "train.lr=1e18", "train.max_bad_steps=2",
                                   "train.mini_batches=1"]]  # the first update blows up
    proc = cli("recipes/sft.hpt", *sets, "-o", str(run), "--quiet")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    train = [r for r in lines(run) if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [False, True, True]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "model.name=/no/such/model"], "/no/such/model"),
        (["--set", "data.train=/no/such/data.jsonl"], "/no/such/data.jsonl"),
        (["--set", "train.nosuch=1"], "nosuch"),
        (["--resume", "/no/such/run"], "/no/such/run"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = cli("recipes/hpt.hpt", *args, *(["-o", str(tmp_path / "r")] if "--resume" not in args else []))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_json_logs_and_quiet(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=1"]]
    proc = cli("recipes/grpo.hpt", *sets, "-o", str(tmp_path / "j"), "--json-logs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [json.loads(x) for x in proc.stdout.splitlines()]
    assert printed == lines(tmp_path / "j")
    quiet = cli("recipes/grpo.hpt", *sets, "-o", str(tmp_path / "q"), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == ""


@pytest.mark.slow
def test_run_draws_its_figures_and_prints_where(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=2"]]
    proc = cli("recipes/hpt.hpt", *sets, "-o", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    plots = tmp_path / "r" / "plots"
    for name in ("accuracy", "reward", "gate-hpt", "loss-hpt"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (plots / f"{name}.svg").exists(), name
    assert "figures" in proc.stderr and "plots" in proc.stderr
    bare = cli("recipes/hpt.hpt", *sets, "-o", str(tmp_path / "n"), "--no-plots", "--quiet")
    assert bare.returncode == 0 and not (tmp_path / "n" / "plots").exists()


PARITY = '''
def parity(response, answer):
    """0 or 1 by the response's characters: groups with and without reward variance."""
    return float(sum(map(ord, response)) % 2)
'''


@pytest.mark.slow
def test_the_first_update_takes_the_live_policy_as_pi_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizer steps per rollout batch: the first updates from pi_old itself, so its rows
    skip the pi_old pass and its rows of zero advantage are not forwarded; the run ends with the
    weights of one that computes pi_old for every row, up to float32 noise."""
    import torch
    from safetensors.torch import load_file

    from hpt_dsl.learner.torch import TorchLearner
    from hpt_dsl.train import Trainer

    rows = [{"question": f"What is {i + 2} + {3 * i + 1}?", "answer": str(4 * i + 3)} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "fo_rewards.py").write_text(PARITY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sets = [*SMALL, "train.steps=3", "train.lr=0.003", "rollout.n=4", f"data.train={tmp_path / 'train.jsonl'}",
            "data.reward=fo_rewards:parity", "train.mini_batches=2"]  # fmt: skip
    seen: dict[str, list[Any]] = {"live": [], "old_rows": []}
    prepare, logprobs = Trainer._prepare, TorchLearner.logprobs

    def spy_prepare(self: Trainer, batch: Any, step: int, **passes: Any) -> Any:
        if "step_moments" in passes:  # an optimizer mini-batch's prepare
            seen["live"].append(bool(passes.get("old_is_current")))
        return prepare(self, batch, step, **passes)

    def spy_logprobs(self: TorchLearner, batch: Any, which: str = "policy") -> Any:
        seen["old_rows"].append(len(batch))
        return logprobs(self, batch, which)

    monkeypatch.setattr(Trainer, "_prepare", spy_prepare)
    monkeypatch.setattr(TorchLearner, "logprobs", spy_logprobs)
    a = run_recipe(RECIPES / "grpo.hpt", overrides=sets, output=tmp_path / "a", quiet=True)
    fast = dict(seen)
    seen.update(live=[], old_rows=[])
    monkeypatch.setattr(Trainer, "_first_update_on_policy", lambda self: False)
    b = run_recipe(RECIPES / "grpo.hpt", overrides=sets, output=tmp_path / "b", quiet=True)
    assert fast["live"] == [True, False] * 3 and seen["live"] == [False, False] * 3
    assert sum(fast["old_rows"]) < sum(seen["old_rows"]), (fast["old_rows"], seen["old_rows"])
    wa = load_file(a.run_dir / "final-model" / "model.safetensors")
    wb = load_file(b.run_dir / "final-model" / "model.safetensors")
    base = load_file(a.run_dir / "base-model" / "model.safetensors")
    assert max(float((wa[k] - base[k]).abs().max()) for k in wa) > 1e-3, "the updates must move the weights"
    la = [r for r in lines(a.run_dir) if r["kind"] == "train"]
    lb = [r for r in lines(b.run_dir) if r["kind"] == "train"]
    assert any(0 < r["reward/mean"] < 1 for r in la), "rewards must differ within steps"
    for x, y in zip(la, lb, strict=True):  # the same rollouts, losses and gradients up to float32 noise
        assert x["reward/mean"] == y["reward/mean"] and x["clip_frac"] == pytest.approx(y["clip_frac"], abs=1e-7)
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    # Adam divides by the gradient's running scale, so a gradient entry near 0 turns float32 noise
    # into a step of up to lr: all but a few weights agree to 1e-6, and none by more than 3 steps
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert int((diff > 1e-6).sum()) <= 1e-4 * diff.numel() and float(diff.max()) < 3 * 0.003
