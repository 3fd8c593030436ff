"""Checkpoints: complete or absent, newest kept, RNG restored, a crash mid-write leaves the previous one."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpt_dsl import checkpoint as ckpt


class FakeLearner:
    """Writes one file per save, as a learner does; records what it loaded."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.loaded: float | None = None

    def save(self, path: Path) -> None:
        (path / "policy.txt").write_text(str(self.value))

    def load(self, path: Path) -> None:
        self.loaded = float((path / "policy.txt").read_text())


def test_save_list_latest_and_keep(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, FakeLearner(step), {"bad_steps": 0}, keep=2)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-000002", "step-000003"]
    assert ckpt.latest_checkpoint(tmp_path) == found[-1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_incomplete_folders_are_never_picked(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, FakeLearner(1), {})
    (tmp_path / "checkpoints" / ".tmp-step-000002").mkdir()  # a write that was killed
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # no state.json: not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"  # type: ignore[union-attr]
    ckpt.save_checkpoint(tmp_path, 2, FakeLearner(2), {})
    assert not (tmp_path / "checkpoints" / ".tmp-step-000002").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"  # type: ignore[union-attr]


def test_load_restores_learner_state_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(5)
    random.seed(5)
    path = ckpt.save_checkpoint(tmp_path, 4, FakeLearner(4.5), {"bad_steps": 1, "elapsed": 2.0})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    learner = FakeLearner()
    state = ckpt.load_checkpoint(path, learner)
    assert learner.loaded == 4.5
    assert state["step"] == 4 and state["bad_steps"] == 1 and state["elapsed"] == 2.0
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())


def test_a_crash_during_the_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from hpt_dsl import checkpoint as ckpt

        class L:
            def save(self, path):
                (path / "policy.txt").write_text("x")

        for step in (1, 2, 3):
            ckpt.save_checkpoint(Path({str(tmp_path)!r}), step, L(), {{}})
        """
    )
    env = {**os.environ, "HPT_DSL_FAULT": "checkpoint:2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 86, proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    assert (tmp_path / "checkpoints" / ".tmp-step-000002" / "policy.txt").exists()  # the torn write


@pytest.mark.parametrize("bad", ["checkpoint:x", "", "other:1"])
def test_fault_hook_is_inert_unless_it_names_this_write(bad: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HPT_DSL_FAULT", bad)
    ckpt.save_checkpoint(tmp_path, 1, FakeLearner(), {})
    assert ckpt.latest_checkpoint(tmp_path) is not None
