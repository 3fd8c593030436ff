"""A default run prints no third-party warning: no deprecation from transformers' cache API,
no accelerator notice from DeepSpeed (which a plain run does not use)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_recipe_runs_without_warning_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/hpt.hpt", "--set", "train.steps=2",
         "--set", "train.eval_every=0", "--set", "train.questions=4", "-o", str(tmp_path / "run"), "--quiet",
         "--no-plots"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    noisy = [line for line in out.stderr.splitlines() if re.search(r"warn|deprecat", line, re.IGNORECASE)]
    assert noisy == []
