"""The hf engine's decode-time KV cache and attention: no copy of the cache per step.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``,
which copies the whole cache every step (time quadratic in the response length), and its
SDPA path on a CPU with a padding mask repeats grouped-query keys and values
(``repeat_kv``) to the query heads' count, another full copy per layer and step. Sampling
knows the final length of every call (prompt width + ``max_new_tokens``), so:

* ``preallocate`` turns the cache that the prefill returned into layers backed by one
  buffer of that many columns each; a step writes its column in place and attention reads
  a view of the columns written so far (``SlotLayer``);
* ``sampling_attention`` makes the model's SDPA calls take grouped-query keys as they are
  (``enable_gqa=True``) for the duration of the sampling loop, where it is exact (the
  kernel repeats nothing, the arithmetic is the same).

Both only apply to plain full-attention caches (``models.plain_cache``) and to models on
SDPA; anything else samples through transformers' own path unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

DECODE_SDPA = "hpt_dsl_decode_sdpa"  # the attention implementation registered for sampling


@functools.cache
def slot_layer() -> type:
    """The ``SlotLayer`` class (built on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """A full-attention layer whose keys and values are the first ``length`` columns of
        preallocated buffers ``(batch, heads, capacity, head_dim)``; ``update`` writes the new
        columns in place and returns the views."""

        def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
            super().__init__()
            b, h, n, d = keys.shape
            self.buffer_k = keys.new_empty(b, h, capacity, d)
            self.buffer_v = values.new_empty(b, values.shape[1], capacity, values.shape[-1])
            self.buffer_k[:, :, :n] = keys
            self.buffer_v[:, :, :n] = values
            self.length = n
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._views()

        def _views(self) -> None:
            self.keys = self.buffer_k[:, :, : self.length]
            self.values = self.buffer_v[:, :, : self.length]

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            end = self.length + key_states.shape[-2]
            if end > self.buffer_k.shape[2]:
                raise RuntimeError(f"KV cache of {self.buffer_k.shape[2]} columns is full")
            self.buffer_k[:, :, self.length : end] = key_states
            self.buffer_v[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def select_rows(self, moved: Tensor, source: Tensor, keep: int) -> None:
            """Row ``moved[i]`` takes row ``source[i]`` (all reads before the writes), then the
            first ``keep`` rows stay (views of the buffers)."""
            for buf in (self.buffer_k, self.buffer_v):
                buf.index_copy_(0, moved, buf.index_select(0, source))
            self.buffer_k, self.buffer_v = self.buffer_k[:keep], self.buffer_v[:keep]
            self._views()

    return SlotLayer


def preallocate(cache: Any, capacity: int) -> None:
    """Replace every layer of ``cache`` (a plain ``DynamicCache`` after the prefill) by a
    ``SlotLayer`` of ``capacity`` columns holding the same keys and values."""
    cls = slot_layer()
    cache.layers = [cls(layer.keys, layer.values, capacity) for layer in cache.layers]


def _decode_sdpa(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' SDPA attention while sampling, grouped-query heads taken as they are:
    softmax(q k^T * scaling + mask) v, output (batch, q_len, heads, dim). A one-token query
    (a decode step) is two batched products, each group of query heads against its key head
    ``(b, kv, g, d) @ (b, kv, d, n)``, cheaper on a CPU than the fused kernel at one query row."""
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len == 1 and (attention_mask is None or attention_mask.dtype == torch.bool):
        scale = dim**-0.5 if scaling is None else scaling
        q = query.view(b, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)
        if attention_mask is not None:  # True where a query may attend
            scores.masked_fill_(~attention_mask.view(b, 1, 1, -1), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), value)
        return out.view(b, 1, heads, dim), None
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=q_len > 1 and attention_mask is None,
        enable_gqa=kv_heads != heads,
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if DECODE_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(DECODE_SDPA, _decode_sdpa)
        AttentionMaskInterface.register(DECODE_SDPA, sdpa_mask)


@contextlib.contextmanager
def sampling_attention(model: Any) -> Iterator[None]:
    """While sampling, a model on SDPA on a CPU attends through ``_decode_sdpa``; the
    learner's forward passes are untouched (restored on exit)."""
    config = getattr(model, "config", None)
    device = next(model.parameters()).device
    if config is None or config._attn_implementation != "sdpa" or device.type != "cpu":
        yield
        return
    _register()
    config._attn_implementation = DECODE_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
