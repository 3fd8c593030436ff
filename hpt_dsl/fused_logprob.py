"""Log-probabilities (and entropy) of the taken tokens straight from the last hidden states and
the output head, in chunks of tokens: the (tokens x vocabulary) logits are never held.

For hidden states h (N x H), the head's weight W (V x H) and bias b (V, optional), targets y
(N) and temperature tau, with x = z / tau the scaled logits of one token, z = W h + b:

    lse        = logsumexp_v x_v
    log p(y)   = x_y - lse                                        = z_y / tau - logsumexp(z / tau)
    H          = -sum_v p_v log p_v = lse - sum_v p_v x_v,        p = softmax(x) = exp(x - lse)

Gradients, for upstream gradients g (of the log-probs) and e (of the entropies):

    dz_v = ( g (onehot(y)_v - p_v)  -  e p_v (log p_v + H) ) / tau
    dh   = dz W            dW = sum_tokens dz^T h            db = sum_tokens dz

Each chunk of ``rows`` tokens meets the head one block of ``VOCAB_BLOCK`` vocabulary
columns at a time (a (rows x block) matmul). Forward: the running maximum, sum of
exponentials and, for the entropy, the sum of exp(x - m)(x - m) over the blocks give lse,
log p(y) and H (N numbers each); no block outlives its step. Backward: each block's logits
are recomputed from h and W (one more matmul), p = exp(x - lse), dz is formed in place and
turned into its share of dh (one matmul) and added into its rows of dW (one matmul). Four
matmuls of N x H x V against the plain path's three, and at most two float32 blocks alive
plus dW, instead of two N x V tensors (the logits and their gradient); blocks of many
tokens keep the matmuls efficient.

Precision: the matmuls run in the head's dtype, or in autocast's dtype inside an autocast
region (as the plain ``lm_head`` would); the softmax, log-probs and entropies in float32
(float64 for float64 inputs); dW is summed over chunks in float32 (float64) and returned in
the weight's dtype.

ZeRO-3: ``gather`` is a context manager factory (e.g. ``deepspeed.zero.GatheredParameters``
of the head) entered around the forward chunks and again around the backward chunks, so the
head's weight is whole there; every process must call the function the same number of times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

VOCAB_BLOCK = 16_384
"""Vocabulary columns per block: a chunk of tokens meets the head a block at a time."""
CHUNK_BYTES = {"cpu": 64 << 20, "other": 256 << 20}
"""Float32 logits per (chunk x block): 64 MiB on a CPU (1,024 tokens x 16,384 columns),
256 MiB on an accelerator (4,096 tokens)."""

Gather = Callable[[], contextlib.AbstractContextManager[Any]]


def fused_rows(vocab: int, device: torch.device | str) -> int:
    """Tokens per chunk: as many as the device's budget of float32 logits holds for one
    vocabulary block (at least 16)."""
    kind = torch.device(device).type
    budget = CHUNK_BYTES["cpu" if kind == "cpu" else "other"]
    return max(16, budget // (4 * max(min(vocab, VOCAB_BLOCK), 1)))


def _dtypes(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): autocast's dtype inside an autocast region, else the
    weight's; float64 softmax for float64 matmuls, else float32."""
    kind = hidden.device.type
    mm = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    return mm, (torch.float64 if mm == torch.float64 else torch.float32)


def _scaled_logits(h: Tensor, w: Tensor, b: Tensor | None, work: torch.dtype, tau: float) -> Tensor:
    """x = (h W^T + b) / tau of one chunk, in the softmax dtype (a fresh tensor)."""
    z = F.linear(h, w, b)
    x = z if z.dtype == work else z.to(work)
    return x.div_(tau) if tau != 1.0 else x


def _blocks(V: int, cols: int) -> list[tuple[int, int]]:
    """The vocabulary's blocks [v0, v1) of at most ``cols`` columns."""
    return [(v, min(V, v + cols)) for v in range(0, V, cols)]


def _in_block(y: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(whether each target is in [v0, v1), its column there, clamped into the block)."""
    return (y >= v0) & (y < v1), (y - v0).clamp(0, v1 - v0 - 1)


class _FusedLogprobs(torch.autograd.Function):
    """Forward per chunk of tokens, over the vocabulary's blocks with a running maximum m:

        s1 = sum_v exp(x_v - m),   s2 = sum_v exp(x_v - m) (x_v - m)      (rescaled when m grows)
        lse = m + log s1,   log p(y) = x_y - lse,   H = log s1 - s2 / s1

    Backward per chunk and block: x recomputed, p = exp(x - lse), dz as in the module's
    docstring, dh += dz W_block, dW_block += dz^T h."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        with_entropy: bool,
        rows: int,
        gather: Gather,
    ) -> tuple[Tensor, Tensor]:
        mm, work = _dtypes(hidden, weight)
        N, dev, blocks = hidden.shape[0], hidden.device, _blocks(weight.shape[0], VOCAB_BLOCK)
        lse = torch.empty(N, dtype=work, device=dev)
        x_y = torch.empty(N, dtype=work, device=dev)
        ent = torch.empty(N, dtype=work, device=dev) if with_entropy else lse.new_empty(0)
        with torch.autocast(dev.type, enabled=False):  # the caller has gathered the head
            w = weight.to(mm)
            b = None if bias is None else bias.to(mm)
            for s in range(0, N, rows):
                h, y = hidden[s : s + rows].to(mm), targets[s : s + rows]
                m = torch.full(y.shape, torch.finfo(work).min, dtype=work, device=dev)
                s1, s2 = torch.zeros_like(m), torch.zeros_like(m)
                for v0, v1 in blocks:
                    x = _scaled_logits(h, w[v0:v1], None if b is None else b[v0:v1], work, temperature)
                    inside, col = _in_block(y, v0, v1)
                    x_y[s : s + rows] = torch.where(inside, x.gather(1, col[:, None]).squeeze(1), x_y[s : s + rows])
                    m_new = torch.maximum(m, x.amax(1))
                    scale = (m - m_new).exp_()
                    e = x.sub_(m_new[:, None])  # x - m_new
                    p = e.exp()
                    p_sum = p.sum(1)
                    if with_entropy:
                        s2 = (s2 + (m - m_new) * s1).mul_(scale).add_(p.mul_(e).sum(1))
                    s1 = s1.mul_(scale).add_(p_sum)
                    m = m_new
                    del x, e, p
                log_s1 = s1.log()
                lse[s : s + rows] = m + log_s1
                if with_entropy:
                    ent[s : s + rows] = log_s1 - s2 / s1
        lp = x_y - lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.mm, ctx.temperature, ctx.rows, ctx.gather = mm, temperature, rows, gather
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        nones = (None,) * 5
        if not ctx.with_entropy:
            g_ent = None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None:
            return None, None, None, *nones
        mm, work, tau, rows = ctx.mm, lse.dtype, ctx.temperature, ctx.rows
        N, dev = hidden.shape[0], hidden.device
        grad_h = torch.empty_like(hidden) if want_h else None
        with ctx.gather(), torch.autocast(dev.type, enabled=False):
            w = weight.to(mm)
            b = None if bias is None else bias.to(mm)
            grad_w = torch.zeros(w.shape, dtype=work, device=dev) if want_w else None
            grad_b = torch.zeros(w.shape[0], dtype=work, device=dev) if want_b and bias is not None else None
            for s in range(0, N, rows):
                h, y = hidden[s : s + rows].to(mm), targets[s : s + rows]
                gl = None if g_lp is None else g_lp[s : s + rows, None].to(work)
                ge = None if g_ent is None else g_ent[s : s + rows, None].to(work)
                dh = torch.zeros(h.shape, dtype=work, device=dev) if grad_h is not None else None
                for v0, v1 in _blocks(w.shape[0], VOCAB_BLOCK):
                    w_b = w[v0:v1]
                    d = _scaled_logits(h, w_b, None if b is None else b[v0:v1], work, tau)
                    d.sub_(lse[s : s + rows, None])  # log p
                    if ge is None:
                        d.exp_().mul_(-gl)  # -g p
                    else:
                        p = d.exp()
                        d.add_(ent[s : s + rows, None]).mul_(-ge)
                        if gl is not None:
                            d.sub_(gl)
                        d.mul_(p)  # (-e (log p + H) - g) p
                        del p
                    if gl is not None:
                        inside, col = _in_block(y, v0, v1)
                        d.scatter_add_(1, col[:, None], torch.where(inside[:, None], gl, 0.0))
                    if tau != 1.0:
                        d.div_(tau)
                    dz = d if d.dtype == mm else d.to(mm)
                    del d
                    if dh is not None:
                        if dz.dtype == work:
                            dh.addmm_(dz, w_b)
                        else:
                            dh.add_(dz @ w_b)
                    if grad_w is not None:
                        if dz.dtype == work:
                            grad_w[v0:v1].addmm_(dz.t(), h)
                        else:
                            grad_w[v0:v1].add_(dz.t() @ h)
                    if grad_b is not None:
                        grad_b[v0:v1].add_(dz.sum(0, dtype=work))
                if grad_h is not None and dh is not None:
                    grad_h[s : s + rows] = dh
        gw = None if grad_w is None else grad_w.to(weight.dtype)
        gb = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, gw, gb, *nones


def fused_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    bias: Tensor | None = None,
    chunk: int | None = None,
    gather: Gather | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of ``targets`` (...) under the logits ``(hidden W^T + bias) / temperature``
    for ``hidden`` (..., H) and the head ``weight`` (V, H), and the entropies when
    ``with_entropy``: float32 (float64 for a float64 head), of ``targets``' shape,
    differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    chunk: tokens per chunk (default ``fused_rows``: the device's budget of float32 logits);
    gather: entered around every use of ``weight`` (ZeRO-3: the head gathered).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    gather = gather if gather is not None else contextlib.nullcontext
    with gather():  # the head's shape is its own only when gathered
        H = weight.shape[-1]
        if weight.dim() != 2 or hidden.shape[-1] != H or targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"expected hidden (..., H), weight (V, H) and targets (...); got {tuple(hidden.shape)}, "
                f"{tuple(weight.shape)} and {tuple(targets.shape)}"
            )
        rows = max(1, chunk if chunk is not None else fused_rows(weight.shape[0], hidden.device))
        lp, ent = _FusedLogprobs.apply(
            hidden.reshape(-1, H), weight, bias, targets.reshape(-1).long(), float(temperature),
            bool(with_entropy), rows, gather,
        )  # fmt: skip
    shape = targets.shape
    return lp.view(shape), (ent.view(shape) if with_entropy else None)
