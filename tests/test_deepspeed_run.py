"""``hpt-dsl run`` on the DeepSpeed learner over several processes, started by torchrun (gloo
on this CPU): the same training as one process, one writer, Ctrl-C and resume across
processes, and bad settings refused before any model is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "train.questions=4",
    "rollout.n=2",
    "rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "data.max_test=6",
    "train.micro_batch=2",
    "train.threads=1",
    "learner.engine=deepspeed",
]


def command(*args: str, world: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)] if world > 1 else [
        sys.executable]
    return [*launcher, "-m", "hpt_dsl.cli.main", "run", *args, "--quiet"]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str, world: int = 1, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args, world=world), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env())


def sets(*extra: str) -> list[str]:
    return [f"--set={s}" for s in (*SMALL, *extra)]


def lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_two_processes_train_as_one(tmp_path: Path, stage: int) -> None:
    """SFT (no sampling: both runs see the same rows) over two optimizer mini-batches a step,
    each split across the processes: the same weights and metrics as one process."""
    common = sets("train.steps=3", "train.mini_batches=2", "train.eval_every=0", "train.save_every=0",
                  "train.lr=0.003", f"learner.zero_stage={stage}")
    one = run("recipes/sft.hpt", *common, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run("recipes/sft.hpt", *common, "-o", str(tmp_path / "two"), world=2)
    assert two.returncode == 0, two.stderr[-3000:]

    a = load_file(tmp_path / "one" / "final-model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final-model" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff

    train_one = [r for r in lines(tmp_path / "one") if r["kind"] == "train"]
    train_two = [r for r in lines(tmp_path / "two") if r["kind"] == "train"]
    assert [r["step"] for r in train_two] == [1, 2, 3]  # one writer: every step once
    for x, y in zip(train_one, train_two, strict=True):
        assert x["rows"] == y["rows"] == 4 and x["demos"] == y["demos"] == 4
        assert x["grad_norm"] > 0  # the weights moved
        for key in ("loss", "grad_norm", "tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4), key
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_resume_finishes(tmp_path: Path) -> None:
    """HPT (rollouts, gate) on two processes: Ctrl-C in the terminal (SIGINT to the launcher and
    to both workers) saves one checkpoint after the same step on both; --resume finishes."""
    out = tmp_path / "run"
    args = sets("train.save_every=0", "train.eval_every=0", "learner.zero_stage=2")
    proc = subprocess.Popen(
        command("recipes/hpt.hpt", *args, "--set=train.steps=200", "-o", str(out), world=2), cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and '"kind": "train"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=600)
    assert "interrupted at step" in err and "--resume" in err, err[-3000:]

    (ckpt,) = (out / "checkpoints").iterdir()
    done = [r for r in lines(out) if r["kind"] == "train"]
    assert [r["step"] for r in done] == list(range(1, len(done) + 1))
    assert ckpt.name == f"step-{done[-1]['step']:06d}"
    assert {p.name for p in ckpt.iterdir()} >= {"state.json", "rng.safetensors", "rng-rank1.safetensors",
                                                 "deepspeed.json", "policy"}
    for row in done:  # gate shares are over all questions of the step, from both processes
        assert row["gate/sft"] + row["gate/grpo"] == pytest.approx(1.0)

    stop = done[-1]["step"] + 2
    resumed = run("recipes/hpt.hpt", *args, f"--set=train.steps={stop}", "--resume", str(out), world=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in lines(out) if r["kind"] == "train"] == list(range(1, stop + 1))
    assert (out / "final-model" / "model.safetensors").exists()


def test_several_processes_need_the_deepspeed_learner(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/sft.hpt", "-o", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'several processes need learner.engine = "deepspeed"' in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_wrong_deepspeed_override_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"train_batch_size": 128, "gradient_accumulation_steps": 3}))  # 2 * 3 * 1
    proc = subprocess.run(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/sft.hpt", *sets(),
         f"--set=learner.deepspeed_config={json.dumps(str(override))}", "-o", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{override}:" in proc.stderr and "train_batch_size = 128" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written, no model built


@pytest.mark.slow
def test_zero3_over_two_processes_trains_with_the_hf_engine(tmp_path: Path) -> None:
    """GRPO/SFT with rollouts on a ZeRO-3 learner over two processes: the hf engine samples in
    lockstep with the partitioned model, both processes evaluate together (rank 0 reports), and
    the run finishes with one final model."""
    out = tmp_path / "run"
    proc = run("recipes/hpt.hpt", *sets("train.steps=2", "train.eval_every=0", "train.save_every=0",
                                        "learner.zero_stage=3"), "-o", str(out), world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = lines(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]  # written once, by rank 0
    for r in (r for r in rows if r["kind"] == "train"):  # 4 questions x (2 rollouts + a demonstration)
        assert r["rows"] == 12 and r["demos"] == 4 and r["response_length"] > 0
    assert (out / "final-model" / "model.safetensors").exists()
