"""Sampling on a CPU: one decode step of a Llama-family model as a function of its weights.

transformers' forward pass serves every model and every use. In a decode step on a CPU,
at one token for each of a few rows, that generality costs: on SmolLM2-135M (30 layers,
16 rows, 2 threads) about a quarter of the step went to some 1,800 small kernels and the
Python around them, and its q/k/v and gate/up projections ran as five thin matrix products
where two wider ones do the same arithmetic faster. For the models whose decoder layer is
the Llama layer (``ARCHITECTURES``), a decode step here is one function over the model's
own weights. Per layer, with x the rows' hidden states (rows, d) and p their positions:

    h      = rmsnorm(x) * w_in                       rmsnorm(x) = x / sqrt(mean(x^2) + eps)
    [q k v] = h [Wq; Wk; Wv]^T + [bq; bk; bv]        one product (biases: Qwen2)
    q, k   = rope(q, p), rope(k, p)                  cos, sin from the model's rotary embedding
    K, V   = the layer's cache with k, v written     (``kv.SlotLayer``, in place)
    x      = x + softmax(q K^T * scaling + mask) V Wo^T + bo     each query-head group on its key head
    h      = rmsnorm(x) * w_post
    [g u]  = h [Wg; Wu]^T                            one product
    x      = x + (silu(g) * u) Wd^T

    logits = (rmsnorm(x) * w_norm) W_head^T

the arithmetic of transformers' forward pass up to float32 summation order (the tests
compare both to 1e-5). A ``LlamaDecodeStep`` is built for each call of the sampling loop,
after the prefill, when the weights are current: every product of at least
``cpu_linear.MIN_WEIGHT`` weights is packed for oneDNN for the call's row count
(``cpu_linear.Packed``, 1.4-1.6x the unpacked product at 16 rows), smaller ones run through
``F.linear``. The packed copies (the stacked [Wq; Wk; Wv] and [Wg; Wu] among them) take as
much memory as the weights for the length of the call, so the engine uses the step only
where the system has twice that available (``memory_allows``).

It applies to float32 models on a CPU, outside ZeRO-3 and autocast, whose every projection
is a plain ``nn.Linear`` (no adapter or quantised layer), with SiLU MLPs, no bias in the
MLP and no sliding-window layer (``eligible``; otherwise sampling keeps transformers'
forward pass). The prefill always runs through transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.rollout import cpu_linear

ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})
"""transformers classes whose decoder layer is the Llama layer written out above."""

Product = Callable[[Tensor], Tensor]


def _product(weight: Tensor, bias: Tensor | None, rows: int) -> Product:
    """x -> x W^T + b: packed for oneDNN (``cpu_linear.Packed``) from ``cpu_linear.MIN_WEIGHT``
    weights on, torch's default kernel below."""
    if cpu_linear.available() and weight.numel() >= cpu_linear.MIN_WEIGHT:
        return cpu_linear.Packed(weight, bias, rows)
    return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)


def _stacked(linears: list[Any], rows: int) -> Product:
    """One product for several linear layers over the same input: their outputs side by side."""
    weight = torch.cat([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return _product(weight, None, rows)
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    return _product(weight, bias, rows)


def memory_allows(model: Any) -> bool:
    """True when a packed copy of ``model``'s weights takes at most half the memory the
    system has available (``MemAvailable``; True where that is not known)."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with open("/proc/meminfo") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need <= free_kb * 1024 // 2


@dataclass(frozen=True)
class _Layer:
    w_in: Tensor
    qkv: Product
    out: Product
    w_post: Tensor
    gate_up: Product
    down: Product
    eps_in: float
    eps_post: float
    scaling: float


def _plain(module: Any) -> bool:
    return type(module) is torch.nn.Linear and "forward" not in vars(module)


def eligible(model: Any) -> bool:
    """True when ``model`` is one of ``ARCHITECTURES`` in the form written out above, in
    float32 on a CPU and not partitioned by ZeRO-3. (Asked before ``cpu_linear.onednn_linears``
    replaces the layers' ``forward``, which would make every layer look adapted.)"""
    config = getattr(model, "config", None)
    if type(model).__name__ not in ARCHITECTURES or not type(model).__module__.startswith("transformers."):
        return False
    if config is None or getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) > 1:
        return False
    types = getattr(config, "layer_types", None)
    if any(t != "full_attention" for t in types) if types else getattr(config, "sliding_window", None) is not None:
        return False
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or hasattr(p, "ds_id") for p in params):
        return False
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(_plain(m) for m in linears) or any(m.bias is not None for m in linears[4:]):
            return False
    head = model.get_output_embeddings()
    return _plain(head) and head.bias is None


class LlamaDecodeStep:
    """``step(tokens, positions, mask, cache)``: the float32 logits (rows, V) of the next
    token after feeding one token per row (module docstring), the cache's layers updated."""

    def __init__(self, model: Any, rows: int) -> None:
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm, self.eps = decoder.norm.weight, decoder.norm.variance_epsilon
        self.head = _product(model.get_output_embeddings().weight, None, rows)
        self.layers = [
            _Layer(
                w_in=layer.input_layernorm.weight,
                qkv=_stacked([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], rows),
                out=_product(layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias, rows),
                w_post=layer.post_attention_layernorm.weight,
                gate_up=_stacked([layer.mlp.gate_proj, layer.mlp.up_proj], rows),
                down=_product(layer.mlp.down_proj.weight, None, rows),
                eps_in=layer.input_layernorm.variance_epsilon,
                eps_post=layer.post_attention_layernorm.variance_epsilon,
                scaling=layer.self_attn.scaling,
            )
            for layer in decoder.layers
        ]

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache: Any) -> Tensor:
        """``tokens``, ``positions``: (rows,); ``mask``: (rows, columns), nonzero where a row
        may attend (the columns already in the cache, then the new one)."""
        rows, heads, kv, dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        x = self.embed(tokens)
        cos, sin = self.rotary(x[:, None], positions[:, None])  # (rows, 1, dim)
        cos, sin = cos[:, None], sin[:, None]  # against (rows, kv heads, group, dim)
        hidden = (mask == 0).view(rows, 1, 1, -1)
        for layer, cached in zip(self.layers, cache.layers, strict=True):
            qkv = layer.qkv(_rms(x, layer.w_in, layer.eps_in))
            q = qkv[:, : heads * dim].view(rows, kv, heads // kv, dim)
            k = qkv[:, heads * dim : (heads + kv) * dim].view(rows, kv, 1, dim)
            v = qkv[:, (heads + kv) * dim :].view(rows, kv, 1, dim)
            keys, values = cached.update(_rope(k, cos, sin), v)
            scores = torch.matmul(_rope(q, cos, sin), keys.transpose(-1, -2)).mul_(layer.scaling)
            attended = torch.matmul(torch.softmax(scores.masked_fill_(hidden, float("-inf")), -1), values)
            x = x + layer.out(attended.reshape(rows, heads * dim))
            gate, up = layer.gate_up(_rms(x, layer.w_post, layer.eps_post)).chunk(2, dim=-1)
            x = x + layer.down(torch.nn.functional.silu(gate).mul_(up))
        return self.head(_rms(x, self.norm, self.eps))


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + rotate_half(x) sin, rotate_half([a, b]) = [-b, a] (transformers' convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
