"""Sampling on a CPU: the large linear layers through oneDNN's inner product.

A decode step multiplies every weight matrix by a few rows, one per running sequence.
For such skinny products torch's default float32 ``F.linear`` on x86 (MKL's sgemm) runs
well below what the same CPU does through oneDNN's inner-product primitive
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own CPU inference path uses).
Measured with 2 threads on 16 rows: 1.1-1.4x faster for weights of ``MIN_WEIGHT`` (2^18)
elements and more, 2.2x on SmolLM2-135M's 49,152 x 576 output head, and no faster below
that size, so smaller layers keep the default path.

For the duration of sampling (``onednn_linears``), each such ``nn.Linear`` computes

    y = x W^T + b

through that kernel instead: the same product, only the summation order differs (float32
rounding, ~1e-6 relative). It applies to float32 weights on a CPU, without autocast,
outside ZeRO-3 (whose parameters are gathered by hooks), and to plain ``nn.Linear``
modules only (not subclasses such as quantised layers, nor modules whose ``forward``
another library has already replaced). Everything is restored on exit, so the learner's
forward and backward passes are untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

MIN_WEIGHT = 1 << 18
"""Weights of fewer elements keep torch's default kernel (oneDNN is not faster there)."""


def available() -> bool:
    """True when this torch has oneDNN's linear kernel on this CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b through oneDNN, for any leading shape of ``x`` (``F.linear``'s contract)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


PACK_BLOCK_BYTES = 24 << 20
"""A packed weight is stored in blocks of output rows of at most this many bytes."""


class Packed:
    """x -> x W^T + b with W reordered once into oneDNN's blocked layout for products of
    about ``rows`` rows (``torch.ops.mkldnn._reorder_linear_weight``, the packing of torch's
    own frozen CPU inference graphs). The kernel then reads W in the order its inner loop
    wants instead of walking the plain row-major matrix: measured at 16 rows on 2 threads,
    1.4-1.6x the plain oneDNN product (about 150 GFLOP/s on SmolLM2's layers, the rate of a
    1024^3 GEMM), at any row count from 1 to 368.

    Packing copies W. It is done in blocks of output rows of at most ``PACK_BLOCK_BYTES``,
    below glibc's largest mmap threshold: a training process (``hpt_dsl.malloc``) repacks
    into heap memory it already holds, ~1.3 ms per 7 MB, where one block of fresh pages
    costs 20-40x that in page faults. The output is the blocks' outputs side by side."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        fan_in = weight.shape[1]
        block = max(64, PACK_BLOCK_BYTES // (fan_in * weight.element_size()) // 64 * 64)
        weights = weight.detach().split(block)
        biases = bias.detach().split(block) if bias is not None else [None] * len(weights)
        pack = torch.ops.mkldnn._reorder_linear_weight
        self.blocks = [(pack(w.contiguous(), rows), b) for w, b in zip(weights, biases, strict=True)]

    def __call__(self, x: Tensor) -> Tensor:
        outs = [linear(x, w, b) for w, b in self.blocks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _forward(module: torch.nn.Linear, x: Tensor) -> Tensor:
    return linear(x, module.weight, module.bias)


def eligible(module: Any) -> bool:
    """A plain float32 ``nn.Linear`` on a CPU with at least ``MIN_WEIGHT`` weights whose
    ``forward`` nobody has replaced."""
    w = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear
        and "forward" not in vars(module)
        and w is not None
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.is_contiguous()
        and w.numel() >= MIN_WEIGHT
    )


@contextlib.contextmanager
def onednn_linears(model: Any, enabled: bool = True) -> Iterator[int]:
    """While inside, the eligible linear layers of ``model`` run through oneDNN; yields
    how many. Nothing changes when ``enabled`` is false, oneDNN is missing, or the model
    is partitioned by ZeRO-3."""
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    chosen = [m for m in model.modules() if eligible(m)] if enabled and available() and not zero3 else []
    for m in chosen:
        m.forward = functools.partial(_forward, m)
    try:
        yield len(chosen)
    finally:
        for m in chosen:
            vars(m).pop("forward", None)
