"""Sampling's oneDNN linear layers: the same product, chosen layers only, restored on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hpt_dsl import models
from hpt_dsl.rollout import cpu_linear
from hpt_dsl.rollout.base import SamplingParams
from hpt_dsl.rollout.hf import HFRolloutEngine

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN")


class Quantised(torch.nn.Linear):
    """A subclass stands for layers with their own kernels: never replaced."""


def test_large_float32_linears_give_the_same_product_and_are_restored() -> None:
    torch.manual_seed(0)
    big, small, sub = torch.nn.Linear(576, 512), torch.nn.Linear(64, 64), Quantised(576, 512)
    wide = torch.nn.Linear(512, 1024, bias=False).double()
    model = torch.nn.ModuleList([big, small, sub, wide])
    x = torch.randn(3, 5, 576)
    expected = x @ big.weight.T + big.bias
    with torch.no_grad(), cpu_linear.onednn_linears(model) as chosen:
        assert chosen == 1 and "forward" in vars(big)
        assert all("forward" not in vars(m) for m in (small, sub, wide))
        got = big(x)
    assert got.shape == (3, 5, 512)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model)
    with cpu_linear.onednn_linears(model, enabled=False) as chosen:
        assert chosen == 0


def test_a_forward_replaced_by_another_library_is_left_alone() -> None:
    layer = torch.nn.Linear(1024, 512)
    layer.forward = lambda x: x  # e.g. an accelerate hook
    with cpu_linear.onednn_linears(layer) as chosen:
        assert chosen == 0
    assert vars(layer)["forward"](1) == 1


def test_sampling_through_onednn_gives_the_log_probs_of_a_fresh_forward_pass(tmp_path, monkeypatch) -> None:
    """Every linear layer of the tiny model through oneDNN (threshold lowered to 0): each
    sampled log-prob equals a fresh forward pass through the default kernels, and the layers
    are plain again after sampling."""
    model, tok = models.load_local(models.build_tiny(tmp_path / "m", seed=0))
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0)
    seen: list[int] = []
    original = cpu_linear.onednn_linears

    @contextlib.contextmanager
    def recording(*a: Any, **k: Any) -> Iterator[int]:
        with original(*a, **k) as chosen:
            seen.append(chosen)
            yield chosen

    monkeypatch.setattr("hpt_dsl.rollout.hf.onednn_linears", recording)
    engine = HFRolloutEngine(model, tok)
    prompts = [tok(s, add_special_tokens=False).input_ids for s in ("3+5", "47+38")]
    out = engine.generate(prompts, SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=4))
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert seen == [n_linear] and n_linear > 0
    assert all("forward" not in vars(m) for m in model.modules())
    for r in out:
        ids = torch.tensor([prompts[r.prompt_index] + list(r.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[r.prompt_index]) - 1 : -1].double()
        expected = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-4)
