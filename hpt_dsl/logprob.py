"""Memory-lean log-probabilities (and entropy) of the taken tokens, from logits.

For logits z of shape (B, T, V), targets y (B, T) and temperature tau, with x = z / tau:

    log pi(y_t) = x_{t, y_t} - logsumexp_v x_{t, v}
    H_t         = -sum_v p_{t, v} log p_{t, v},                       p = softmax(x_t)

The naive ``log_softmax(z.float()).gather(...)`` keeps a float32 (B, T, V) tensor alive
for the backward pass and allocates two more in it; with a 150k vocabulary this is the
learner's memory peak. Here the rows are processed in chunks: the forward pass keeps
only the per-token logsumexp, and the backward pass recomputes each chunk's softmax and
writes the gradient

    d/dz_{t,v} = ( g_t * (onehot(y_t)_v - p_{t,v})  +  h_t * (-p_{t,v} (log p_{t,v} + H_t)) ) / tau

(g = upstream gradient of the log-probs, h = of the entropy) straight into the result.
Peak memory is the gradient itself plus one chunk of float32 work space.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22
"""Default work space per chunk: about 4M logits (16 MiB in float32)."""


def _blocks(B: int, T: int, rows: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, time slice) blocks of at most ``rows`` tokens each, covering (B, T)."""
    if T <= rows:
        per = rows // T
        for b in range(0, B, per):
            yield slice(b, b + per), slice(None)
    else:
        for b in range(B):
            for t in range(0, T, rows):
                yield slice(b, b + 1), slice(t, t + rows)


def _scaled(z: Tensor, temperature: float) -> tuple[Tensor, bool]:
    """(z / tau in float32 (float64 for float64 z), whether it is a fresh buffer we may overwrite)."""
    x = z if z.dtype in (torch.float32, torch.float64) else z.float()
    fresh = x is not z
    if temperature != 1.0:
        x = x.div_(temperature) if fresh else x / temperature
        fresh = True
    return x, fresh


def _forward_block(
    z: Tensor, y: Tensor, tau: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log pi(y), logsumexp, entropy or None) of one block; its work space dies on return."""
    x, _ = _scaled(z, tau)
    m = torch.logsumexp(x, dim=-1)
    lp = x.gather(-1, y[..., None]).squeeze(-1) - m
    if not with_entropy:
        return lp, m, None
    logp = x - m[..., None]
    return lp, m, -(logp.exp() * logp).sum(-1)  # -sum p log p: no cancellation between large terms


def _backward_block(
    z: Tensor,
    y: Tensor,
    tau: float,
    lse: Tensor,
    ent: Tensor | None,
    g_lp: Tensor | None,
    g_ent: Tensor | None,
) -> Tensor:
    """d loss / d z for one block:  (g (onehot - p) - h p (log p + H)) / tau."""
    x, fresh = _scaled(z, tau)
    logp = x.sub_(lse[..., None]) if fresh else x - lse[..., None]
    gl = None if g_lp is None else g_lp[..., None]
    if g_ent is not None and ent is not None:
        p = logp.exp()
        d = logp.add_(ent[..., None]).mul_(p).mul_(-g_ent[..., None])  # -h p (log p + H)
        if gl is not None:
            d.sub_(p.mul_(gl))
    else:
        d = logp.exp_().mul_(-gl)  # -g p, in the one work buffer
    if gl is not None:
        d.scatter_add_(-1, y[..., None], gl.to(d.dtype))
    return d.div_(tau) if tau != 1.0 else d


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, rows: int
    ) -> tuple[Tensor, Tensor]:
        B, T, _ = logits.shape
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lp = torch.empty(B, T, dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        for bs, ts in _blocks(B, T, rows):
            lp_b, lse_b, ent_b = _forward_block(logits[bs, ts], targets[bs, ts], temperature, with_entropy)
            lp[bs, ts], lse[bs, ts] = lp_b, lse_b
            if ent_b is not None:
                ent[bs, ts] = ent_b
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(
        ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None]:
        logits, targets, lse, ent = ctx.saved_tensors
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        if g_lp is None and g_ent is None:
            return grad, None, None, None, None
        B, T, _ = logits.shape
        use_ent = g_ent is not None and ctx.with_entropy
        for bs, ts in _blocks(B, T, ctx.rows):
            grad[bs, ts] = _backward_block(
                logits[bs, ts],
                targets[bs, ts],
                ctx.temperature,
                lse[bs, ts],
                ent[bs, ts] if use_ent else None,
                None if g_lp is None else g_lp[bs, ts],
                g_ent[bs, ts] if use_ent else None,
            )
        return grad, None, None, None, None


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of ``targets`` (B, T) under ``logits`` (B, T, V) / temperature, and the
    per-token entropy when ``with_entropy``; both float32 (float64 for float64 logits), both
    differentiable with respect to the logits.

    chunk: tokens processed at once (default: about 4M logits of work space).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T); got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    V = logits.shape[-1]
    rows = max(1, chunk if chunk is not None else CHUNK_ELEMENTS // max(V, 1))
    lp, ent = _TokenLogprobs.apply(logits, targets.long(), float(temperature), bool(with_entropy), rows)
    return lp, (ent if with_entropy else None)


def naive_token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """The textbook path, for comparison: log_softmax(z / tau).gather(y)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.long()[..., None]).squeeze(-1)
