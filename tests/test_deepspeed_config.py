"""The DeepSpeed config: generated from the recipe's settings; a user override is merged and
checked, and a wrong one is a clear error (with the file and key) before any model exists."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from hpt_dsl.learner.ds_config import DeepSpeedConfigError, build_config, generate, merge, preflight
from hpt_dsl.settings import Settings


def settings(**learner: object) -> Settings:
    s = Settings()
    s.learner.engine = "deepspeed"
    for key, value in learner.items():
        setattr(s.learner, key, value)
    return s


def with_override(tmp_path: Path, override: object, **learner: object) -> Settings:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(override))
    return settings(deepspeed_config=str(path), **learner)


def test_generated_config_follows_the_recipe() -> None:
    s = settings(zero_stage=2, precision="bf16")
    s.train.micro_batch, s.train.questions, s.rollout.n, s.train.grad_clip = 4, 16, 8, 0.5
    s.train.mini_batches = 2
    config = generate(s, world_size=2, cuda=False)
    # 16 questions * 8 rollouts / 2 mini-batches = 64 rows; 64 / (4 * 2) = 8 accumulation steps
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == 4 * 8 * 2
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}  # bf16 weights, fp32 gradient sums
    assert config["gradient_clipping"] == 0.5
    assert "optimizer" not in config  # CPU: the learner passes torch.optim.AdamW


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_accumulate_in_fp32_at_every_stage(stage: int, precision: str) -> None:
    """DeepSpeed's own parser reads the generated config as fp32 accumulation (with bf16
    weights its engine then keeps fp32 gradient buffers: ZeRO-1's BF16 optimizer, ZeRO-2/3's
    gradient_accumulation_dtype)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    s = settings(zero_stage=stage, precision=precision)
    config = build_config(s, world_size=1, cuda=True)
    parsed = DeepSpeedConfig({k: v for k, v in config.items() if k != "train_batch_size"})
    assert parsed.grad_accum_dtype == "fp32"
    assert parsed.bfloat16_config.enabled == (precision == "bf16")


def test_bf16_without_zero_is_an_error() -> None:
    """Without ZeRO DeepSpeed cannot accumulate bf16 gradients in fp32: refused, with the fix."""
    with pytest.raises(DeepSpeedConfigError, match='learner.precision = "bf16" needs learner.zero_stage >= 1'):
        build_config(settings(precision="bf16", zero_stage=0), world_size=1, cuda=False)
    assert build_config(settings(precision="fp32", zero_stage=0), world_size=1, cuda=False)["data_types"] == {
        "grad_accum_dtype": "fp32"}


def test_cuda_config_uses_deepspeed_adamw_and_offload() -> None:
    s = settings(zero_stage=3, offload=True)
    s.train.lr, s.train.weight_decay = 3e-4, 0.1
    config = generate(s, world_size=1, cuda=True)
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_merge_replaces_nested_keys_only() -> None:
    base = {"a": 1, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    out = merge(base, {"zero_optimization": {"overlap_comm": False}, "b": [1]})
    assert out == {"a": 1, "b": [1], "zero_optimization": {"stage": 2, "overlap_comm": False}}
    assert base["zero_optimization"]["overlap_comm"] is True


def test_valid_override_is_applied(tmp_path: Path) -> None:
    s = with_override(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}, "train_batch_size": 256},
                      zero_stage=2)
    s.train.micro_batch = 64
    config = build_config(s, world_size=2, cuda=False)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["gradient_accumulation_steps"] == 2  # derived from train_batch_size: 256 / (64 * 2)


@pytest.mark.parametrize(
    ("override", "learner", "expected"),
    [
        ({"train_batch_size": 100}, {}, "train_batch_size = 100 but train_micro_batch_size_per_gpu"),
        ({"train_batch_size": 128, "gradient_accumulation_steps": 3}, {}, "= 64 * 3 * 2 = 384"),
        ({"zero_optimization": {"stage": 3}}, {"zero_stage": 2},
         "contradicts the recipe's learner.zero_stage"),
        ({"bf16": {"enabled": True}}, {}, "contradicts the recipe's learner.precision"),
        ({"train_micro_batch_size_per_gpu": 8}, {}, "contradicts the recipe's train.micro_batch"),
        ({"fp16": {"enabled": True}}, {}, "fp16 is not supported"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, {"zero_stage": 2},
         "needs ZeRO stage 3"),
        ({"zero_optimisation": {"stage": 2}}, {}, "did you mean 'zero_optimization'"),
        ({"zero_optimization": {"overlap_comms": True}}, {"zero_stage": 2},
         "zero_optimization.overlap_comms: Extra inputs are not permitted"),
        ({"optimizer": {"type": "AdamW"}}, {}, "on CPU the learner uses torch.optim.AdamW"),
        ({"gradient_accumulation_steps": 0}, {}, "gradient_accumulation_steps = 0 must be a positive"),
    ],
)
def test_wrong_override_names_file_key_and_fix(tmp_path: Path, override: dict, learner: dict,
                                               expected: str) -> None:
    s = with_override(tmp_path, override, **learner)
    with pytest.raises(DeepSpeedConfigError) as err:
        build_config(s, world_size=2, cuda=False)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "ds.json") + ":")
    assert expected in message


def test_offload_without_zero_is_an_error() -> None:
    with pytest.raises(DeepSpeedConfigError, match="learner.offload = true needs learner.zero_stage >= 1"):
        build_config(settings(offload=True, zero_stage=0), world_size=1, cuda=False)


def test_every_zero_stage_over_processes_with_either_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's check passes every ZeRO stage over several processes, with the hf engine
    (which samples in lockstep under ZeRO-3) and with vLLM (an engine on every process)."""
    assert preflight(settings(zero_stage=3))["zero_optimization"]["stage"] == 3  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    for engine, stage in itertools.product(("hf", "vllm"), (0, 2, 3)):
        s = settings(zero_stage=stage)
        s.rollout.engine = engine
        config = preflight(s)
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * 2 * config[
            "gradient_accumulation_steps"]


def test_bad_json_and_missing_file_give_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n  "train_batch_size": }\n')
    with pytest.raises(DeepSpeedConfigError, match=r"bad\.json:2:23: invalid JSON"):
        build_config(settings(deepspeed_config=str(bad)), world_size=1, cuda=False)
    with pytest.raises(DeepSpeedConfigError, match="not found"):
        build_config(settings(deepspeed_config=str(tmp_path / "none.json")), world_size=1, cuda=False)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="must be a JSON object"):
        build_config(settings(deepspeed_config=str(listed)), world_size=1, cuda=False)
