"""The memory-lean log-prob kernel: same numbers and gradients as log_softmax + gather, and
at most half its peak memory at a 32k vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hpt_dsl.logprob import chunk_rows, naive_token_logprobs, token_logprobs


def reference(
    logits: torch.Tensor, targets: torch.Tensor, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.double() / tau, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_values_and_gradients_match_log_softmax(chunk: int | None, tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 7, 50, generator=g)).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=g)
    w_lp, w_h = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    lp, H = token_logprobs(logits, targets, temperature=tau, with_entropy=True, chunk=chunk)
    lp_ref, H_ref = reference(logits, targets, tau)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(H.double(), H_ref, rtol=0, atol=1e-5)
    grad = torch.autograd.grad((lp * w_lp).sum() + (H * w_h).sum(), logits)[0]
    grad_ref = torch.autograd.grad((lp_ref * w_lp).sum() + (H_ref * w_h).sum(), logits, retain_graph=True)[0]
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=0, atol=1e-5)
    only_lp = torch.autograd.grad(
        (token_logprobs(logits, targets, tau, chunk=chunk)[0] * w_lp).sum(), logits
    )[0]
    torch.testing.assert_close(
        only_lp.double(), torch.autograd.grad((lp_ref * w_lp).sum(), logits)[0].double(), atol=1e-5, rtol=0
    )


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 3), generator=g)

    def f(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp, H = token_logprobs(z, targets, temperature=0.8, with_entropy=True, chunk=4)
        return lp, H

    assert torch.autograd.gradcheck(f, (logits,))


def test_bfloat16_and_non_contiguous_logits() -> None:
    """Logits as a model returns them: bf16, sliced to the response columns."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, 9, 40, generator=g).to(torch.bfloat16).requires_grad_()
    logits = full[:, 2:8]
    assert not logits.is_contiguous()
    targets = torch.randint(0, 40, (2, 6), generator=g)
    lp, _ = token_logprobs(logits, targets, chunk=5)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, naive_token_logprobs(logits, targets), rtol=0, atol=1e-5)
    lp.sum().backward()
    assert full.grad.dtype == torch.bfloat16 and full.grad[:, :2].abs().sum() == 0


def test_without_grad_and_bad_input() -> None:
    with torch.no_grad():
        lp, H = token_logprobs(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), with_entropy=True)
    torch.testing.assert_close(lp, torch.full((1, 2), -torch.log(torch.tensor(4.0))))
    torch.testing.assert_close(H, torch.full((1, 2), torch.log(torch.tensor(4.0))))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor memory while ``fn`` runs, from the profiler's allocation timeline
    (tensors that existed before are not counted)."""
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        fn()
    live = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        name = str(action).rsplit(".", 1)[-1]
        if name == "CREATE":
            live += size
        elif name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def test_peak_memory_is_at_most_half_the_naive_path() -> None:
    """Forward and backward at V = 32k, 512 tokens: the naive path holds the float32 log-softmax,
    its gradient and the logits' gradient at once; the kernel holds the gradient and one chunk."""
    B, T, V = 1, 512, 32_000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    w = torch.randn(B, T, generator=g)

    def lean() -> None:
        lp, _ = token_logprobs(logits, targets)
        (lp * w).sum().backward()
        logits.grad = None

    def naive() -> None:
        (naive_token_logprobs(logits, targets) * w).sum().backward()
        logits.grad = None

    lean()  # warm up the profiler and allocator
    lean_peak, naive_peak = peak_bytes(lean), peak_bytes(naive)
    grad_bytes = B * T * V * 4
    assert naive_peak >= 2.5 * grad_bytes  # the measurement sees the naive path's three (B, T, V) tensors
    assert lean_peak >= grad_bytes  # ... and the kernel's gradient
    assert lean_peak <= 0.5 * naive_peak


def test_the_chunk_is_a_memory_budget_per_device() -> None:
    """At Qwen2.5's vocabulary a CPU chunk stays cache-sized (27 tokens), a GPU chunk is
    hundreds of tokens (not 27 kernel-launch-bound ones) within its 256 MiB budget."""
    V = 151_936
    assert chunk_rows(V, "cpu") == (16 << 20) // (4 * V) == 27
    gpu = chunk_rows(V, torch.device("cuda", 3))
    assert gpu >= 400 and gpu * V * 4 <= 256 << 20 < (gpu + 1) * V * 4
    assert chunk_rows(32_000, "cuda") == 2097
    assert chunk_rows(10**9, "cuda") == 1
