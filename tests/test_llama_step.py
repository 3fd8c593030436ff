"""The Llama-family decode step: transformers' logits, which models it takes, packed products."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hpt_dsl import models
from hpt_dsl.batch import pad_left, positions
from hpt_dsl.rollout import cpu_linear, hf, llama_step
from hpt_dsl.rollout.base import SamplingParams
from hpt_dsl.rollout.kv import preallocate

SHAPE = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64}  # fmt: skip


def _model(kind: str) -> Any:
    """Tiny random models of each architecture, in the variants the step must get right."""
    torch.manual_seed(0)
    if kind == "llama, tied head":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True))
    elif kind == "llama, untied head, biases, llama3 rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, rope_parameters=rope))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    else:
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None))
    with torch.no_grad():  # biases are zero at initialisation: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "sdpa"
    return model.eval()


KINDS = ["llama, tied head", "llama, untied head, biases, llama3 rope", "qwen2", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["default kernel", "packed oneDNN"])
def test_each_decode_step_gives_transformers_logits(kind: str, packed: bool, monkeypatch) -> None:
    """From the same prefill of left-padded prompts, six decode steps through the step and
    through the model's own forward pass give the same logits (1e-5 relative), with rows of
    different lengths and positions; the step's cache holds the same keys and values."""
    if packed and not cpu_linear.available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0 if packed else 1 << 40)
    model = _model(kind)
    assert llama_step.eligible(model)
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], 0)
    steps = 6
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        ours, theirs = copy.deepcopy(out.past_key_values), out.past_key_values
        preallocate(ours, ids.shape[1] + steps)
        step = llama_step.LlamaDecodeStep(model, rows=3)
        full = torch.cat([mask, mask.new_ones(3, steps)], 1)
        pos = mask.sum(1)
        tokens = torch.randint(1, 300, (steps, 3), generator=torch.Generator().manual_seed(1))
        for t in range(steps):
            cols = full[:, : ids.shape[1] + t + 1]
            expected = model(
                input_ids=tokens[t, :, None], attention_mask=cols, position_ids=pos[:, None] + t,
                past_key_values=theirs, use_cache=True,
            ).logits[:, -1]  # fmt: skip
            got = step(tokens[t], pos + t, cols, ours)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def test_models_outside_the_written_out_layer_keep_transformers_forward_pass() -> None:
    model = _model("llama, tied head")
    assert llama_step.eligible(model)
    assert not llama_step.eligible(copy.deepcopy(model).to(torch.bfloat16))
    gelu = LlamaForCausalLM(LlamaConfig(**SHAPE, hidden_act="gelu"))
    assert not llama_step.eligible(gelu)
    window = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=4))
    assert not llama_step.eligible(window)
    mlp_bias = LlamaForCausalLM(LlamaConfig(**SHAPE, mlp_bias=True))
    assert not llama_step.eligible(mlp_bias)
    adapted = copy.deepcopy(model)  # an adapter or quantised layer replaces forward or the class
    adapted.model.layers[1].mlp.up_proj.forward = lambda x: x
    assert not llama_step.eligible(adapted)

    class Subclass(LlamaForCausalLM):
        pass

    assert not llama_step.eligible(Subclass(model.config))


@pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_a_packed_weight_in_blocks_gives_the_same_product(rows: int, monkeypatch) -> None:
    """Packed for 16 rows, in blocks of 64 output rows (a small block size), the product with
    any number of rows equals x W^T + b."""
    monkeypatch.setattr(cpu_linear, "PACK_BLOCK_BYTES", 64 * 48 * 4)
    w, b = torch.randn(200, 48), torch.randn(200)
    product = cpu_linear.Packed(w, b, rows=16)
    assert len(product.blocks) == 4  # 64 + 64 + 64 + 8 output rows
    x = torch.randn(rows, 48)
    expected = x.double() @ w.double().T + b.double()
    assert torch.allclose(product(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_the_engine_decodes_through_the_step_and_samples_the_model_policy(tmp_path, monkeypatch) -> None:
    """On the built-in (Llama) model every decode step of a sampling call goes through the
    step, and each sampled log-prob equals a fresh forward pass; under autocast it does not."""
    model, tok = models.load_local(models.build_tiny(tmp_path / "m", seed=0))
    calls: list[int] = []
    original = llama_step.LlamaDecodeStep.__call__

    def counted(self: Any, *a: Any) -> torch.Tensor:
        calls.append(a[0].shape[0])
        return original(self, *a)

    monkeypatch.setattr(llama_step.LlamaDecodeStep, "__call__", counted)
    engine = hf.HFRolloutEngine(model, tok)
    prompts = [tok(s, add_special_tokens=False).input_ids for s in ("3+5", "47+38")]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=9, seed=3))
    assert calls and calls[0] == 4 and len(calls) == max(len(r.token_ids) for r in out) - 1
    for r in out:
        ids = torch.tensor([prompts[r.prompt_index] + list(r.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[r.prompt_index]) - 1 : -1].double()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-4)
    calls.clear()
    engine.autocast = torch.bfloat16
    engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, seed=3))
    assert calls == []
