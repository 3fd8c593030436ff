"""bench/gpu_smoke.sh on a CPU: the dry run lists the checks and the paths they need; the
probe installs hpt-dsl with ``pip install --target`` and shows that the script's Python
imports that copy (grammar included), not the checkout; a run without a GPU records why it
stopped in the results JSON and exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_smoke.sh"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_smoke  # noqa: E402


def smoke(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_dry_run_lists_the_checks_and_the_paths_it_needs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = smoke("--dry-run", WORK=str(tmp_path / "work"), OUT=str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for check in gpu_smoke.CHECKS:
        assert f"  {check.name} " in text and f"cap {check.cap_s:>3} s" in text
    for path in (".whl/*.whl", ".whl/smollm2-135m/config.json", str(tmp_path / "work"), str(out), f"{out}/logs"):
        assert f"  {path} " in text, path
    assert "Python packages missing here: none" in text and "CUDA here: False" in text
    assert not out.exists() and not (tmp_path / "work").exists()  # a dry run writes nothing
    assert {"grpo_shared_prompts", "zero3_hf", "fused_adam"} <= set(gpu_smoke.BY_NAME)  # shared prompts, ZeRO-3 hf


@pytest.mark.slow
def test_the_scripts_python_imports_the_installed_copy(tmp_path: Path) -> None:
    """The package is installed with ``pip install --target WORK/site`` (--no-deps
    --no-build-isolation, offline) and the checks run from WORK with it first on the path:
    hpt_dsl and its grammar (a package only through the package-dir mapping) come from there,
    while the same interpreter started in the checkout would import the checkout."""
    work, out = tmp_path / "work", tmp_path / "out"
    proc = smoke("--probe", WORK=str(work), OUT=str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_smoke: CHECK install: ok" in proc.stdout and "gpu_smoke: CHECK env: ok" in proc.stdout
    site = work / "site"
    assert (site / "hpt_dsl" / "grammar" / "hpt.lark").is_file() and list(site.glob("hpt_dsl-*.dist-info"))
    env = json.loads((out / "gpu_smoke.json").read_text())["checks"]["env"]
    assert env["installed_copy"] is True
    assert Path(env["hpt_dsl"]).resolve() == (site / "hpt_dsl" / "__init__.py").resolve()
    assert Path(env["grammar"]).resolve().is_relative_to(site.resolve())
    assert (out / "logs" / "env.log").is_file() and (out / "logs" / "install.log").is_file()
    checkout = subprocess.run([sys.executable, "-c", "import hpt_dsl; print(hpt_dsl.__file__)"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    assert not Path(checkout).resolve().is_relative_to(site.resolve())  # the precedence is the script's doing


@pytest.mark.slow
def test_a_run_without_a_gpu_records_why_it_stopped(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    proc = smoke(WORK=str(work), OUT=str(out), CHECKS="env zero3_hf")
    assert proc.returncode == 1
    assert "gpu_smoke: CHECK env: FAILED" in proc.stdout and "no CUDA GPU visible" in proc.stdout
    assert "nothing else can run" in proc.stderr
    data = json.loads((out / "gpu_smoke.json").read_text())
    assert data["checks"]["install"]["status"] == "ok"
    assert data["checks"]["env"]["status"] == "failed" and "no CUDA GPU visible" in data["checks"]["env"]["error"]
    assert "zero3_hf" not in data["checks"] and data["mode"] == "run" and data["budget_s"] == 450


def test_a_check_that_dies_is_recorded_from_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the shell records for a check killed by its cap, one never started, and the verdict."""
    monkeypatch.setenv("SMOKE_RESULTS", str(tmp_path / "r.json"))
    log = tmp_path / "x.log"
    log.write_text("step 1\nstep 2\n")
    gpu_smoke.record("env", {"status": "ok", "seconds": 1.0})
    gpu_smoke.outcome("env", 124, 5, str(log))  # it wrote its own entry: kept
    gpu_smoke.outcome("zero3_hf", 124, 150, str(log))
    gpu_smoke.outcome("fused_adam", -1, 0, "")
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert checks["env"]["status"] == "ok"
    assert checks["zero3_hf"] == {"status": "timeout", "exit_code": 124, "seconds": 150, "log_tail": ["step 1",
                                                                                                       "step 2"]}
    assert checks["fused_adam"]["status"] == "skipped"
    assert gpu_smoke.summary("zero3_hf").startswith("gpu_smoke: CHECK zero3_hf: TIMEOUT (150 s)")
    assert gpu_smoke.verdict() == 1
    gpu_smoke.record("zero3_hf", {"status": "ok"})
    assert gpu_smoke.verdict() == 0
