"""Memory-lean log-probabilities (and entropy) of the taken tokens, from logits.

For logits z of shape (B, T, V), targets y (B, T) and temperature tau, with x = z / tau:

    log pi(y_t) = x_{t, y_t} - logsumexp_v x_{t, v}
    H_t         = -sum_v p_{t, v} log p_{t, v},                       p = softmax(x_t)

The naive ``log_softmax(z.float()).gather(...)`` keeps a float32 (B, T, V) tensor alive
for the backward pass and allocates two more in it; with a 150k vocabulary this is the
learner's memory peak. Here the tokens are processed in chunks: the forward pass keeps
nothing of size V (one fused log-softmax per chunk, then the gather), and the backward
pass recomputes each chunk's softmax and writes the gradient

    d/dz_{t,v} = ( g_t * (onehot(y_t)_v - p_{t,v})  +  h_t * (-p_{t,v} (log p_{t,v} + H_t)) ) / tau

(g = upstream gradient of the log-probs, h = of the entropy) straight into the result.
Peak memory is the gradient itself plus one chunk of float32 work space.

The chunk is a memory budget, not a token count: ``rows = budget / (4 V)`` tokens, so that
one chunk's float32 work space is ``budget`` bytes at any vocabulary. The budget is 16 MiB on
a CPU (cache-sized: about 27 tokens at V = 152k) and 256 MiB on a GPU, where each chunk is a
handful of kernel launches and a few tokens a chunk would leave the device idle between
them (about 440 tokens at V = 152k, 2,000 at V = 32k; two such buffers live at once in the
backward pass with the entropy).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

CHUNK_BYTES = {"cpu": 16 << 20, "other": 256 << 20}
"""Float32 work space per chunk: 16 MiB on a CPU, 256 MiB on an accelerator."""


def chunk_rows(vocab: int, device: torch.device | str) -> int:
    """Tokens per chunk: as many as fit the device's work-space budget in float32 (at least 1)."""
    kind = torch.device(device).type
    budget = CHUNK_BYTES["cpu" if kind == "cpu" else "other"]
    return max(1, budget // (4 * max(vocab, 1)))


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


def _work(z: Tensor, tau: float) -> tuple[Tensor, torch.dtype]:
    """(z / tau, the float dtype to compute in: float64 for float64 logits, else float32)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (z if tau == 1.0 else z.to(dtype) / tau), dtype


def _forward_block(z: Tensor, y: Tensor, tau: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """(log pi(y), entropy or None) of one block, from one fused log-softmax; its work space
    dies on return."""
    x, dtype = _work(z, tau)
    logp = torch.log_softmax(x, dim=-1, dtype=dtype)
    lp = logp.gather(-1, y[..., None]).squeeze(-1)
    if not with_entropy:
        return lp, None
    return lp, -(logp.exp() * logp).sum(-1)  # -sum p log p


def _backward_block(
    z: Tensor,
    y: Tensor,
    tau: float,
    ent: Tensor | None,
    g_lp: Tensor | None,
    g_ent: Tensor | None,
    out: Tensor,
) -> None:
    """Write d loss / d z of one block into ``out``:  (g (onehot - p) - h p (log p + H)) / tau,
    with the softmax recomputed by one fused kernel."""
    x, dtype = _work(z, tau)
    gl = None if g_lp is None else g_lp[..., None].to(dtype)
    if g_ent is None or ent is None:
        if out.dtype == dtype:  # work in the gradient itself: no buffer at all
            d = torch.softmax(x, dim=-1, dtype=dtype, out=out).mul_(-gl)  # -g p
        else:
            d = torch.softmax(x, dim=-1, dtype=dtype).mul_(-gl)
    else:
        logp = torch.log_softmax(x, dim=-1, dtype=dtype)
        p = logp.exp()
        d = logp.add_(ent[..., None]).mul_(p).mul_(-g_ent[..., None])  # -h p (log p + H)
        if gl is not None:
            d.sub_(p.mul_(gl))
    if gl is not None:
        d.scatter_add_(-1, y[..., None], gl)
    if tau != 1.0:
        d.div_(tau)
    if d.data_ptr() != out.data_ptr():
        out.copy_(d)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, rows: int
    ) -> tuple[Tensor, Tensor]:
        B, T, _ = logits.shape
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lp = torch.empty(B, T, dtype=out_dtype, device=logits.device)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        for bs, ts in _blocks(B, T, rows):
            lp_b, ent_b = _forward_block(logits[bs, ts], targets[bs, ts], temperature, with_entropy)
            lp[bs, ts] = lp_b
            if ent_b is not None:
                ent[bs, ts] = ent_b
        ctx.save_for_backward(logits, targets, ent)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(
        ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None]:
        logits, targets, ent = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return torch.zeros_like(logits), None, None, None, None
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # every block is written
        B, T, _ = logits.shape
        use_ent = g_ent is not None and ctx.with_entropy
        for bs, ts in _blocks(B, T, ctx.rows):
            _backward_block(
                logits[bs, ts],
                targets[bs, ts],
                ctx.temperature,
                ent[bs, ts] if use_ent else None,
                None if g_lp is None else g_lp[bs, ts],
                g_ent[bs, ts] if use_ent else None,
                out=grad[bs, ts],
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

    chunk: tokens processed at once (default: ``chunk_rows``, the device's work-space budget).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T); got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    V = logits.shape[-1]
    rows = max(1, chunk if chunk is not None else chunk_rows(V, logits.device))
    lp, ent = _TokenLogprobs.apply(logits, targets.long(), float(temperature), bool(with_entropy), rows)
    return lp, (ent if with_entropy else None)


def naive_token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """The textbook path, for comparison: log_softmax(z / tau).gather(y)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.long()[..., None]).squeeze(-1)
