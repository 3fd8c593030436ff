"""The built-in tiny model: a real transformers checkpoint on disk, deterministic from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpt_dsl import models
from hpt_dsl.prompting import encode_prompt, encode_response
from hpt_dsl.settings import ModelSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_tiny_reloads_through_the_auto_classes(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    assert model.config.head_dim == 64  # vLLM's CPU attention needs head_dim >= 64
    assert model.config.vocab_size == models.VOCAB_SIZE >= len(tok)
    assert tok.eos_token == models.EOS and tok.pad_token == models.PAD
    text = "47+38\n7+8=15 \\boxed{85} ~!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_chat_template_and_prompt_template(tiny: Path) -> None:
    _, tok = models.load_local(tiny)
    ids = encode_prompt(tok, "3+5", ModelSettings())
    assert tok.decode(ids) == "<|im_start|>u\n3+5<|im_end|><|im_start|>a\n"
    assert len(ids) == 10
    with_system = encode_prompt(tok, "3+5", ModelSettings(system_prompt="Be brief."))
    assert tok.decode(with_system).startswith("<|im_start|>s\nBe brief.<|im_end|><|im_start|>u\n3+5")
    raw = encode_prompt(tok, "3+5", ModelSettings(prompt_template="Q: {question}\nA:"))
    assert tok.decode(raw) == "Q: 3+5\nA:"
    demo = encode_response(tok, "\\boxed{8}")
    assert demo[-1] == tok.eos_token_id and tok.decode(demo[:-1]) == "\\boxed{8}"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a, _ = models.load_local(models.build_tiny(tmp_path / "a", seed=3))
    b, _ = models.load_local(models.build_tiny(tmp_path / "b", seed=3))
    c, _ = models.load_local(models.build_tiny(tmp_path / "c", seed=4))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_building_does_not_touch_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.build_tiny(tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_load_model_builds_once_under_the_run_folder(tmp_path: Path) -> None:
    model, tok = models.load_model(ModelSettings(), seed=0, workdir=tmp_path)
    assert (tmp_path / "base-model" / "config.json").exists()
    weights = (tmp_path / "base-model" / "model.safetensors").stat().st_mtime_ns
    models.load_model(ModelSettings(), seed=0, workdir=tmp_path)
    assert (tmp_path / "base-model" / "model.safetensors").stat().st_mtime_ns == weights
    assert tok.padding_side == "left"


def test_other_names_go_through_the_hub_loader(tiny: Path) -> None:
    model, tok = models.load_model(ModelSettings(name=str(tiny)), seed=0, workdir=tiny.parent)
    assert model.config.head_dim == 64 and tok.eos_token == models.EOS


def test_a_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="no config.json"):
        models.load_local(tmp_path)


def test_saving_keeps_deepspeed_unimported_and_the_files_whole(tmp_path: Path) -> None:
    """transformers' save_pretrained imports DeepSpeed (and with it MLflow, W&B, TensorBoard)
    when it is installed; hpt-dsl's save skips that in a process that has not imported it,
    and writes what transformers writes: the reloaded model equals the saved one."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from hpt_dsl import models\n"
        f"models.build_tiny(Path({str(tmp_path / 'a')!r}), seed=3)\n"
        f"m, t = models.load_local(Path({str(tmp_path / 'a')!r}))\n"
        f"models.save_pretrained(m, t, Path({str(tmp_path / 'b')!r}))\n"
        "print(sorted(k for k in ('deepspeed', 'mlflow', 'wandb') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    a, _ = models.load_local(tmp_path / "a")
    b, _ = models.load_local(tmp_path / "b")
    reference = dict(models.load_local(models.build_tiny(tmp_path / "c", seed=3))[0].state_dict())
    for state in (a.state_dict(), b.state_dict()):
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(state[key], value), key
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()  # still tied


def test_saving_after_deepspeed_is_imported_keeps_the_unwrap_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once DeepSpeed is imported (a DeepSpeed run), transformers' own unwrap check is left as is."""
    import sys
    import types

    from accelerate.utils import other

    model, tok = models.load_local(models.build_tiny(tmp_path / "a", seed=0))
    seen = []
    monkeypatch.setattr(model, "save_pretrained", lambda path, **kw: seen.append(other.is_deepspeed_available))
    original = other.is_deepspeed_available
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    models.save_pretrained(model, tok, tmp_path / "b")
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    models.save_pretrained(model, tok, tmp_path / "c")
    assert seen[0] is not original and seen[0]() is False
    assert seen[1] is original
