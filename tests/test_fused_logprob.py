"""The fused output-projection + log-prob + entropy path (``hpt_dsl.fused_logprob``) and the
learner's use of it: the plain path's values and gradients (log-probs, entropies, the hidden
states' and the head's gradients, tied and untied heads, with and without bias) in float64 to
1e-12, float32 to 1e-5 relative, bfloat16 loosely; chunks that do not divide the tokens; a
temperature; the unified policy gradient through the fused kernel; a fraction of the plain
path's memory; the learner's default, and its fallback for a model whose logits are not its
head's."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_engine_learner import HPT, _batch, _forward_in_float64, _learner, _prepare, base, exact_norm  # noqa: F401
from test_estimator_math import VARIANTS, compile_spec, make_batch, ref_grad
from test_logprob import peak_bytes

from hpt_dsl import fused_logprob
from hpt_dsl.fused_logprob import fused_rows, fused_token_logprobs
from hpt_dsl.learner import torch as torch_learner
from hpt_dsl.logprob import token_logprobs

D = torch.float64


def plain(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tau: float, bias: torch.Tensor | None = None,
          with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Today's path: the logits, then the chunked log-softmax kernel."""
    return token_logprobs(F.linear(h, w, bias), y, tau, with_entropy)


def inputs(N: int = 21, H: int = 16, V: int = 50, dtype: torch.dtype = D, seed: int = 0, bias: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(3, N // 3, H, generator=g, dtype=dtype).requires_grad_(),
        "w": (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5 * 3).requires_grad_(),
        "b": torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None,
        "y": torch.randint(0, V, (3, N // 3), generator=g),
        "g_lp": torch.randn(3, N // 3, generator=g, dtype=dtype),
        "g_ent": torch.randn(3, N // 3, generator=g, dtype=dtype),
    }


def values_and_grads(x: dict, fused: bool, tau: float, chunk: int | None = None, entropy: bool = True
                     ) -> list[torch.Tensor]:  # fmt: skip
    """[log-probs, entropies, d/dh, d/dW (, d/db)] of sum(g_lp * lp + g_ent * H)."""
    if fused:
        lp, ent = fused_token_logprobs(x["h"], x["w"], x["y"], tau, entropy, bias=x["b"], chunk=chunk)
    else:
        lp, ent = plain(x["h"], x["w"], x["y"], tau, x["b"], entropy)
    loss = (lp * x["g_lp"]).sum() + ((ent * x["g_ent"]).sum() if ent is not None else 0.0)
    wrt = [x["h"], x["w"]] + ([x["b"]] if x["b"] is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    return [lp.detach(), *([] if ent is None else [ent.detach()]), *grads]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("chunk", [1, 4, 5, 64, None])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block", [7, 50, fused_logprob.VOCAB_BLOCK])
def test_float64_values_and_gradients_are_the_plain_paths(chunk: int | None, tau: float, bias: bool, block: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """21 tokens in chunks of 1, 4, 5 (not dividing 21), 64 and the default; the 50 columns of
    the vocabulary in blocks of 7 (not dividing 50) or in one."""
    monkeypatch.setattr(fused_logprob, "VOCAB_BLOCK", block)
    x = inputs(bias=bias)
    fused, ref = values_and_grads(x, True, tau, chunk), values_and_grads(x, False, tau)
    assert len(fused) == (5 if bias else 4)
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == D and a.shape == b.shape and b.abs().max() > 0
        assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("entropy", [False, True])
def test_log_prob_gradient_alone_and_entropy_gradient_alone(entropy: bool) -> None:
    """Without the entropy; and with the entropy's gradient only (the log-probs unused)."""
    x = inputs(seed=1)
    if not entropy:
        for a, b in zip(values_and_grads(x, True, 0.8, 4, False), values_and_grads(x, False, 0.8, entropy=False),
                        strict=True):  # fmt: skip
            assert max_rel(a, b) < 1e-12
        return
    grads = []
    for fused in (True, False):
        if fused:
            _, ent = fused_token_logprobs(x["h"], x["w"], x["y"], 0.8, True, chunk=4)
        else:
            _, ent = plain(x["h"], x["w"], x["y"], 0.8)
        grads.append(torch.autograd.grad((ent * x["g_ent"]).sum(), [x["h"], x["w"]]))
    for a, b in zip(*grads, strict=True):
        assert max_rel(a, b) < 1e-12


def test_tied_head_sums_the_embedding_and_head_gradients() -> None:
    """The head's weight is the input embedding: its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.Embedding(40, 12).double()
    mix = torch.randn(12, 12, generator=g, dtype=D)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    y = torch.randint(0, 40, (2, 9), generator=g)
    w_lp = torch.randn(2, 9, generator=g, dtype=D)
    grads = []
    for fused in (True, False):
        emb.zero_grad()
        h = torch.tanh(emb(ids) @ mix)
        if fused:
            lp, ent = fused_token_logprobs(h, emb.weight, y, 0.9, True, chunk=5)
        else:
            lp, ent = plain(h, emb.weight, y, 0.9)
        ((lp * w_lp).sum() + ent.sum()).backward()
        grads.append(emb.weight.grad.clone())
    assert grads[1].abs().max() > 0
    assert max_rel(grads[0], grads[1]) < 1e-12


def test_gradcheck_float64() -> None:
    x = inputs(N=6, H=5, V=9, seed=3, bias=True)

    def f(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp, ent = fused_token_logprobs(h, w, x["y"], 0.6, True, bias=b, chunk=4)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x["h"], x["w"], x["b"]))


@pytest.mark.parametrize("block", [300, fused_logprob.VOCAB_BLOCK])
def test_float32_matches_the_plain_path_to_1e5_relative(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 at V = 2,000 (36 tokens in chunks of 8; the vocabulary in blocks of 300 or in one)
    against the float64 values: the two paths agree to 1e-5 of each quantity's largest value,
    and the fused one is about as close to float64 as the plain one."""
    monkeypatch.setattr(fused_logprob, "VOCAB_BLOCK", block)
    x32 = inputs(N=36, H=64, V=2000, dtype=torch.float32, seed=4, bias=True)
    x64 = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad)) for k, v in x32.items()}
    x64["y"] = x32["y"]
    exact = values_and_grads(x64, False, 0.7)
    fused, ref = values_and_grads(x32, True, 0.7, 8), values_and_grads(x32, False, 0.7)
    for a, b, e in zip(fused, ref, exact, strict=True):
        assert a.dtype == torch.float32
        assert max_rel(a, b) < 1e-5
        assert max_rel(a, e) < 4 * max(max_rel(b, e), 1e-6)


@pytest.mark.parametrize("where", ["autocast", "weights"])
def test_bfloat16_is_close_to_the_plain_path(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 as the torch learner runs it (float32 weights under autocast) and as DeepSpeed does
    (bf16 weights): matmuls in bf16, the softmax in float32, results loosely the plain path's
    (the vocabulary in blocks of 128)."""
    monkeypatch.setattr(fused_logprob, "VOCAB_BLOCK", 128)
    x = inputs(N=36, H=64, V=500, dtype=torch.float32, seed=5)
    if where == "weights":
        x = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if v is not None and v.is_floating_point()
                 else v) for k, v in x.items()}  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "autocast"):
        fused = values_and_grads(x, True, 0.8, 7)
        ref = values_and_grads(x, False, 0.8)
    assert fused[0].dtype == torch.float32 and fused[3].dtype == x["w"].dtype
    for a, b in zip(fused, ref, strict=True):
        assert max_rel(a, b) < 3e-2


def test_peak_memory_is_a_fraction_of_the_plain_path() -> None:
    """Forward and backward at V = 32k, 512 tokens, chunks of 32 (in blocks of 16k columns): the
    plain path holds the logits and their gradient (two 512 x 32k float32 tensors), the fused
    one two blocks of them and the head's gradient."""
    N, H, V = 512, 64, 32_000
    g = torch.Generator().manual_seed(6)
    h = torch.randn(1, N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) / 8).requires_grad_()
    y = torch.randint(0, V, (1, N), generator=g)
    gl = torch.randn(1, N, generator=g)

    def run(fused: bool) -> None:
        lp, ent = fused_token_logprobs(h, w, y, 1.0, True, chunk=32) if fused else plain(h, w, y, 1.0)
        ((lp * gl).sum() + ent.sum()).backward()
        h.grad = w.grad = None

    run(True)
    fused, ref = peak_bytes(lambda: run(True)), peak_bytes(lambda: run(False))
    logits = N * V * 4
    assert ref >= 2 * logits  # the measurement sees the plain path's logits and their gradient
    assert fused <= 0.2 * ref


def test_chunk_default_and_bad_input() -> None:
    assert fused_logprob.VOCAB_BLOCK == 16_384
    assert fused_rows(151_936, "cpu") == (64 << 20) // (4 * 16_384) == 1024
    assert fused_rows(151_936, "cuda") == 4096
    assert fused_rows(2_000, "cpu") == (64 << 20) // (4 * 2_000)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_token_logprobs(torch.zeros(2, 3), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_token_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), 0.0)
    with torch.no_grad():  # without autograd: values only, nothing saved
        lp, ent = fused_token_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    assert ent is None and torch.allclose(lp, torch.full((2,), -torch.log(torch.tensor(5.0)).item()))


@pytest.mark.parametrize("name", ["sft", "grpo", "luffy_off", "cispo", "gspo", "reinforce_pp"])
def test_unified_policy_gradient_through_the_fused_kernel(name: str) -> None:
    """dL/dh_t = g_t (W_{y_t} - sum_v p_v W_v),  dL/dW = sum_t g_t (onehot(y_t) - p_t) h_t^T,
    g_t the estimator's closed form (tests/test_estimator_math.py), in float64."""
    spec = VARIANTS[name]
    b = make_batch(3)
    B, T = b["mask"].shape
    H, V = 6, 11
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, H, generator=gen, dtype=D, requires_grad=True)
    w = torch.randn(V, H, generator=gen, dtype=D, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    lp, _ = fused_token_logprobs(h, w, targets, chunk=7)
    b["lp"] = lp.detach()
    b["old"] = torch.where(b["mask"], lp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=D), 0.0)
    out = compile_spec(spec)(
        logprobs=lp, old_logprobs=b["old"], ref_logprobs=b["ref"], rewards=b["rewards"], group_ids=b["group_ids"],
        is_demo=b["is_demo"], response_mask=b["mask"],
    )  # fmt: skip
    out.loss.backward()
    g = ref_grad(spec, b)
    p = torch.softmax(F.linear(h.detach(), w.detach()), dim=-1)
    dz = g[..., None] * (F.one_hot(targets, V).to(D) - p)
    assert dz.abs().sum() > 0
    torch.testing.assert_close(h.grad, dz @ w.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(w.grad, torch.einsum("btv,bth->vh", dz, h.detach()), rtol=0, atol=1e-9)


# ----- the learner -------------------------------------------------------------------------------


def untie(learner: Any) -> None:
    """Give the policy a head of its own (a copy of the embedding, perturbed)."""
    model = learner.model
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.01 * torch.randn_like(head.weight))
    model.config.tie_word_embeddings = False
    assert head.weight is not model.get_input_embeddings().weight


def test_the_learner_uses_the_fused_path_by_default(base: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The model is asked for the logits of no position (one at the first pass, the check),
    and the fused kernel gets the hidden states; with learner.fused_logprob = false the model
    returns the logits of every response position."""
    calls: list[int] = []
    real = torch_learner.fused_token_logprobs
    monkeypatch.setattr(torch_learner, "fused_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = _batch()
    widths = {}
    for fused in ("true", "false"):
        learner, program, _ = _learner(base, HPT, f"learner.fused_logprob={fused}")
        seen: list[int] = []
        learner.model.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out.logits.shape[1]))
        calls.clear()
        learner.logprobs(batch)
        learner.update(batch, program, _prepare(program, batch))
        widths[fused] = seen
        assert (len(calls) > 0) == (fused == "true")
    assert widths["true"][0] == 1 and set(widths["true"][1:]) == {0}
    assert max(widths["false"]) > 1  # the responses' logits (a shared prompt pass keeps one position)


@pytest.mark.parametrize("share", ["true", "false"])
@pytest.mark.parametrize("tied", [True, False])
def test_learner_fused_is_the_plain_path_in_float64(base: tuple[Any, Any], exact_norm: None, share: str,  # noqa: F811
                                                    tied: bool) -> None:  # fmt: skip
    """Log-probs, entropies and every parameter's gradient (the head's among them, tied to the
    embedding or not), with and without shared prompts, at temperature 0.7."""
    batch = _batch(questions=3, n=4)
    mb = batch.select(torch.arange(len(batch)))
    out = {}
    for fused in ("true", "false"):
        learner, _, _ = _learner(base, HPT, "rollout.temperature=0.7", f"learner.share_prompts={share}",
                                 f"learner.fused_logprob={fused}")  # fmt: skip
        torch.manual_seed(0)
        if not tied:
            untie(learner)
        out[fused], _ = _forward_in_float64(learner, mb)
        assert (learner._head(learner.model) is not None) == (fused == "true")
    for a, b in zip(out["true"], out["false"], strict=True):
        assert b.abs().max() > 0 or a.abs().max() == 0
        assert torch.allclose(a, b, rtol=0, atol=1e-11 * max(1.0, b.abs().max().item()))


def test_learner_update_in_float32_equals_the_plain_path(base: tuple[Any, Any]) -> None:  # noqa: F811
    """Two updates (HPT with an entropy bonus) in float32: the same parameters to float32 noise
    (AdamW's first steps are about lr * sign(grad), so a gradient near 0 moves by up to lr)."""
    text = HPT.replace("grpo", "grpo entropy=0.01").replace("sft", "sft entropy=0.01")
    params = {}
    for fused in ("true", "false"):
        learner, program, _ = _learner(base, text, f"learner.fused_logprob={fused}", "train.micro_batch=5",
                                       "train.lr=0.0005")  # fmt: skip
        for seed in (0, 1):
            batch = _batch(seed)
            res = learner.update(batch, program, _prepare(program, batch))
            assert not res.skipped
        params[fused] = [p.detach().clone() for p in learner.model.parameters()]
    moved = [p for p in base[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(params["true"], moved, strict=True))
    for a, b in zip(params["true"], params["false"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=5e-6)


def test_a_model_whose_logits_are_not_its_heads_gets_the_plain_path(base: tuple[Any, Any]) -> None:  # noqa: F811
    """A model whose forward scales its head's logits (as softcapping models do): the first
    pass finds it, and from then on the learner computes from the model's own logits."""
    batch = _batch()
    lps = {}
    for fused in ("true", "false"):
        learner, _, _ = _learner(base, HPT, f"learner.fused_logprob={fused}")

        def scaled(mod: Any, args: Any, kwargs: Any, out: Any) -> Any:
            out.logits = out.logits * 1.5
            return out

        learner.model.register_forward_hook(scaled, with_kwargs=True)
        lps[fused] = learner.logprobs(batch)
        assert learner._head(learner.model) is None
    assert torch.equal(lps["true"], lps["false"])


def test_a_config_with_logit_softcapping_has_no_fused_head(base: tuple[Any, Any]) -> None:  # noqa: F811
    from hpt_dsl.learner.head import find_head

    model = copy.deepcopy(base[0])
    assert find_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert find_head(model) is None
    assert fused_logprob.CHUNK_BYTES["cpu"] == 64 << 20
