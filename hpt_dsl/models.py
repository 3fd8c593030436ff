"""Models: the built-in tiny model and tokenizer, and the way every model is loaded.

``model.name = "tiny"`` (the default) builds a small Llama causal LM from the seed with
transformers' own classes, and a character-level tokenizer (the ``tokenizers`` library,
wrapped as ``PreTrainedTokenizerFast``, with a compact chat template). Both are written with
``save_pretrained`` and read back with ``from_pretrained``, so the built-in model takes
exactly the path a real Hugging Face checkpoint takes. Any other name goes to
``hpt_dsl.hub.load_pretrained`` (aliases, local paths, hub names).

The tiny model is a Llama (transformers maps a Qwen2 config to its byte-level tokenizer on
reload, which would replace the character-level one): 2 layers, hidden size 128, 2 attention
heads of head_dim 64, tied embeddings, a 128-token vocabulary (printable ASCII, newline and 4 special tokens).
"""

from __future__ import annotations

import json
import string
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hpt_dsl.errors import InputError
from hpt_dsl.settings import ModelSettings

TINY = "tiny"
PAD, BOS, EOS, IM_START = "<|pad|>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"
SPECIAL = (PAD, BOS, EOS, IM_START)
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # ' ' .. '~'
VOCAB_SIZE = 128

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.05,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'][0] + '\n' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>a\n' }}{% endif %}"
)
"""ChatML with each role written as its initial (s, u, a) and no newline after a turn: the
prompt of ``47+38`` is ``<|im_start|>u\n47+38<|im_end|><|im_start|>a\n`` (12 tokens),
so the tiny model's forward passes spend their time on the question and the answer."""


class ModelError(InputError):
    """A model that cannot be built or loaded; the message says what and how to fix it."""


def build_tiny_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(path: Path, seed: int) -> Path:
    """Write the tiny model (initialised from ``seed``) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        **TINY_CONFIG,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tokenizer, path)
    (path / "hpt_dsl_tiny.json").write_text(json.dumps({"seed": seed}))
    return path


def save_pretrained(model: Any, tokenizer: Any, path: Path, **kwargs: Any) -> None:
    """``model.save_pretrained(path, **kwargs)`` and ``tokenizer.save_pretrained(path)``: the
    same files, without importing DeepSpeed in a process that has not imported it.

    transformers unwraps the model first through accelerate, which imports DeepSpeed whenever
    the package is installed, to test ``isinstance(model, DeepSpeedEngine)``; DeepSpeed in turn
    imports MLflow, W&B and TensorBoard, seconds of a short run's start-up. No model is a
    ``DeepSpeedEngine`` before DeepSpeed is imported, so while it is not in ``sys.modules`` that
    test is skipped (accelerate is told DeepSpeed is unavailable for the call)."""
    from unittest import mock

    try:
        from accelerate.utils import other
    except ImportError:  # no accelerate: transformers unwraps without it
        other = None
    skip = other is not None and hasattr(other, "is_deepspeed_available") and "deepspeed" not in sys.modules
    with mock.patch.object(other, "is_deepspeed_available", lambda: False) if skip else nullcontext():
        model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def load_model(settings: ModelSettings, seed: int, workdir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) for ``settings``; the tiny model is built under ``workdir``
    on first use (``workdir/base-model``) and read back from there."""
    if settings.name != TINY:
        from hpt_dsl import hub  # type: ignore[attr-defined]

        return hub.load_pretrained(settings)
    path = workdir / "base-model"
    if not (path / "config.json").exists():
        build_tiny(path, seed)
    return load_local(path, settings)


def load_local(path: Path, settings: ModelSettings | None = None) -> tuple[Any, Any]:
    """A Hugging Face checkpoint folder (config, safetensors, tokenizer) on disk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or ModelSettings()
    if not (path / "config.json").exists():
        raise ModelError(
            f"model folder {path} has no config.json; point model.name at a Hugging Face checkpoint"
        )
    from transformers import AutoConfig

    from hpt_dsl.hub import _apply_overrides

    config = AutoConfig.from_pretrained(path)
    _apply_overrides(config, settings)  # rope_theta lives in rope_parameters in newer configs
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, settings.dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def plain_cache(cache: Any) -> bool:
    """True when ``cache`` is a ``DynamicCache`` made only of plain full-attention layers
    (``DynamicLayer``): no sliding-window, hybrid or recurrent layer."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(x) is DynamicLayer for x in layers)
