"""The transformers rollout engine: ordering, finish reasons, log-probs, seeds, weight sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from hpt_dsl import models
from hpt_dsl.rollout.base import SamplingParams
from hpt_dsl.rollout.hf import HFRolloutEngine, _compact_order, _sample, _select_rows, filter_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    path = models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return models.load_local(path)


@pytest.fixture(scope="module")
def prompts(tiny: tuple[object, object]) -> list[list[int]]:
    _, tok = tiny
    return [tok(s, add_special_tokens=False).input_ids for s in ("3+5", "47+38", "9")]  # type: ignore[operator]


def _forward_logprobs(model: object, prompt: list[int], response: tuple[int, ...], tau: float) -> torch.Tensor:
    ids = torch.tensor([prompt + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()  # type: ignore[operator]
    return torch.log_softmax(logits / tau, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_n_samples_per_prompt_in_order_with_log_probs_of_the_sampled_tokens(tiny, prompts) -> None:
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    tau = 0.7
    out = engine.generate(prompts, SamplingParams(n=3, temperature=tau, max_new_tokens=12, seed=5))
    assert [r.prompt_index for r in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in out:
        assert len(r.logprobs) == len(r.token_ids) >= 1
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in r.token_ids[:-1]
        else:
            assert len(r.token_ids) == 12 and tok.eos_token_id not in r.token_ids
        # log_softmax(logits / tau) of the sampled token, the learner's convention
        expected = _forward_logprobs(model, prompts[r.prompt_index], r.token_ids, tau)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-4)


def test_left_padding_does_not_change_the_log_probs(tiny, prompts) -> None:
    """A short prompt batched with a long one (left-padded) samples under the same policy."""
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    alone = engine.generate([prompts[2]], SamplingParams(n=1, top_k=1, max_new_tokens=8))
    batched = engine.generate(prompts, SamplingParams(n=1, top_k=1, max_new_tokens=8))
    assert batched[2].token_ids == alone[0].token_ids
    assert batched[2].logprobs == pytest.approx(alone[0].logprobs, abs=1e-4)


def test_same_seed_same_rollouts_other_seed_other_rollouts(tiny, prompts) -> None:
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    p = SamplingParams(n=4, max_new_tokens=10, seed=1)
    a = engine.generate(prompts, p)
    torch.rand(5)  # the global RNG does not matter
    assert engine.generate(prompts, p) == a
    assert engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=2)) != a


def test_greedy_is_the_argmax(tiny, prompts) -> None:
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    out = engine.generate(prompts[:1], SamplingParams(n=1, top_k=1, max_new_tokens=6))[0]
    ids = torch.tensor([prompts[0]])
    expected = []
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            nxt = int(model(ids).logits[0, -1].argmax())  # type: ignore[operator]
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert list(out.token_ids) == expected


def test_no_default_top_k_filtering_sneaks_in(tiny, prompts) -> None:
    """top_k = 0 means the full distribution: with a flat policy, tokens outside the 50 most
    likely ones (transformers' default top_k) get sampled."""
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    out = engine.generate(prompts, SamplingParams(n=16, temperature=5.0, max_new_tokens=16, seed=0))
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1]  # type: ignore[operator]
    top50 = set(torch.topk(logits, 50).indices.tolist())
    firsts = {r.token_ids[0] for r in out if r.prompt_index == 0}
    assert firsts - top50, "every first token came from the top 50: a hidden top-k filter"


def test_load_weights_copies_unshared_tensors(tiny, prompts, tmp_path: Path) -> None:
    model, tok = tiny
    other, _ = models.load_local(models.build_tiny(tmp_path / "other", seed=7))
    engine = HFRolloutEngine(other, tok)
    greedy = SamplingParams(n=1, top_k=1, max_new_tokens=8)
    engine.load_weights(model.named_parameters())  # type: ignore[attr-defined]
    for (_, a), (_, b) in zip(other.named_parameters(), model.named_parameters(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    assert engine.generate(prompts, greedy) == HFRolloutEngine(model, tok).generate(prompts, greedy)


def test_top_k_then_top_p_keep_the_most_likely_tokens() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    x = probs.log()
    kept = lambda k, p: torch.isfinite(filter_logits(x, k, p))[0].nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept(0, 1.0) == [0, 1, 2, 3]
    assert kept(0, 0.4) == [1]  # the most likely token alone already reaches 0.4
    assert kept(0, 0.7) == [1, 3]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(0, 0.9) == [0, 1, 3]
    assert kept(2, 1.0) == [1, 3]
    assert kept(3, 0.9) == [0, 1, 3]
    assert kept(1, 0.01) == [1]


def test_top_p_samples_only_inside_the_nucleus(tiny, prompts) -> None:
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    tau, top_p = 3.0, 0.5
    out = engine.generate(prompts[:1], SamplingParams(n=64, temperature=tau, top_p=top_p, max_new_tokens=1, seed=3))
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1] / tau  # type: ignore[operator]
    nucleus = set(torch.isfinite(filter_logits(logits[None], 0, top_p))[0].nonzero().squeeze(1).tolist())
    firsts = {r.token_ids[0] for r in out}
    assert firsts <= nucleus and len(firsts) > 1
    # the recorded log-prob is the one before the filter (see rollout.base)
    lp = torch.log_softmax(logits.double(), -1)
    for r in out:
        assert r.logprobs[0] == pytest.approx(float(lp[r.token_ids[0]]), abs=1e-4)


def test_sequences_that_stop_early_leave_the_batch_without_disturbing_the_others(tiny, prompts) -> None:
    """With many stop tokens, rows finish at different steps; the rows still running keep the
    right cache: every log-prob equals a fresh forward pass over prompt + response."""
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    engine.eos_ids = set(range(4, 8))  # 4 tokens of 128 end a sequence
    tau = 2.0
    out = engine.generate(prompts, SamplingParams(n=8, temperature=tau, max_new_tokens=30, seed=11))
    lengths = {len(r.token_ids) for r in out}
    assert len(lengths) > 5 and any(r.finish_reason == "length" for r in out)
    for r in out:
        if r.finish_reason == "stop":
            assert r.token_ids[-1] in engine.eos_ids and not set(r.token_ids[:-1]) & engine.eos_ids
        else:
            assert len(r.token_ids) == 30 and not set(r.token_ids) & engine.eos_ids
        expected = _forward_logprobs(model, prompts[r.prompt_index], r.token_ids, tau)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-4)


def _chi_square(x: torch.Tensor, params: SamplingParams, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token counts over ``draws`` draws of ``_sample`` from the one row ``x``, its chi-square
    statistic against softmax(filter(x)) over the tokens the filter keeps)."""
    nxt, lp = _sample(x.expand(draws, -1), params, torch.Generator().manual_seed(0))
    assert torch.equal(lp, torch.log_softmax(x, -1)[0, nxt])  # the unfiltered log-prob
    counts = torch.bincount(nxt, minlength=x.shape[-1]).double()
    expected = torch.softmax(filter_logits(x, params.top_k, params.top_p)[0].double(), -1) * draws
    kept = expected > 0
    return counts, (((counts - expected) ** 2)[kept] / expected[kept]).sum()


def test_sampler_draws_each_token_with_its_softmax_probability() -> None:
    """Inverse-CDF sampling: the frequencies of 20000 draws fit softmax(x) (a fixed seed, so the
    statistic is fixed too); with top-k, the tokens left out, the first and the last among
    them, never come and the others fit the renormalised probabilities."""
    x = torch.tensor([[-1.0, 0.5, 2.0, -3.0, 1.0, 0.0, -0.5, -2.0]])
    _, chi2 = _chi_square(x, SamplingParams(), 20000)
    assert chi2 < 24.3  # the 99.9% quantile of chi-square with 7 degrees of freedom
    counts, chi2 = _chi_square(x, SamplingParams(top_k=4), 20000)
    assert counts[[0, 3, 6, 7]].sum() == 0
    assert chi2 < 16.3  # 3 degrees of freedom


def test_finished_rows_leave_by_moving_the_last_running_rows_into_their_slots() -> None:
    done = torch.tensor([False, True, False, False, True, False, True, False])
    order = _compact_order(done)
    assert order.tolist() == [0, 5, 2, 3, 7]  # rows 1 and 4 finished; rows 5 and 7 take their slots
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(8, 2, 5, 4), torch.randn(8, 2, 5, 4), layer)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    _select_rows(cache, order)
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])


def test_sampler_keeps_tokens_in_the_vocabulary_when_logits_are_not_finite() -> None:
    """Weights that diverged give NaN logits: the sampled index stays a token id and its log-prob
    is NaN (the loop's non-finite check stops the run), rather than an index error here."""
    from hpt_dsl.rollout.base import SamplingParams

    x = torch.full((3, 11), float("nan"))
    gen = torch.Generator().manual_seed(0)
    nxt, lp = _sample(x, SamplingParams(n=1, temperature=1.0), gen)
    assert nxt.tolist() == [10, 10, 10] and torch.isnan(lp).all()


@pytest.fixture(scope="module")
def tiny_gqa(tiny: tuple[object, object]) -> tuple[object, object]:
    """The tiny model with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny
    config = LlamaConfig(
        **{**models.TINY_CONFIG, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model, tok


@pytest.mark.parametrize("llama_step", [True, False], ids=["llama_step", "transformers forward"])
def test_grouped_query_decoding_gives_the_log_probs_of_a_fresh_forward_pass(
    tiny_gqa, prompts, llama_step: bool, monkeypatch
) -> None:
    """Both decode paths (``llama_step``, and transformers' forward pass with KV buffers
    written in place and grouped-query heads attended without repeating them) sample under
    the model's own policy: with rows of different prompt lengths finishing at different
    steps, every log-prob equals a fresh forward pass, and the model's attention is SDPA
    again afterwards."""
    if not llama_step:
        monkeypatch.setattr("hpt_dsl.rollout.llama_step.eligible", lambda model: False)
    model, tok = tiny_gqa
    engine = HFRolloutEngine(model, tok)
    engine.eos_ids = set(range(4, 8))
    out = engine.generate(prompts, SamplingParams(n=4, temperature=1.5, max_new_tokens=24, seed=2))
    assert len({len(r.token_ids) for r in out}) > 3
    for r in out:
        expected = _forward_logprobs(model, prompts[r.prompt_index], r.token_ids, 1.5)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"


def test_slot_layers_write_in_place_and_keep_the_keys_and_values() -> None:
    from hpt_dsl.rollout.kv import preallocate

    cache = DynamicCache()
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    cache.update(k, v, 0)
    preallocate(cache, 8)
    layer = cache.layers[0]
    start = layer.keys.data_ptr()
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values = cache.update(k2, v2, 0)
    assert keys.data_ptr() == start and cache.get_seq_length() == 6
    assert torch.equal(keys, torch.cat([k, k2], 2)) and torch.equal(values, torch.cat([v, v2], 2))
    _select_rows(cache, torch.tensor([2, 1]))  # row 0 finished: the last row moves into its slot
    assert torch.equal(cache.layers[0].keys, torch.cat([k, k2], 2)[[2, 1]])
    with pytest.raises(RuntimeError, match="full"):
        for _ in range(3):
            cache.update(k2[:2], v2[:2], 0)


@pytest.mark.parametrize("vocab", [49152, 5000])  # a whole number of blocks, and a padded last block
def test_a_large_vocabulary_is_searched_by_blocks_with_the_same_result(vocab: int) -> None:
    """The two-level inverse CDF picks the token the one-level one picks (the same targets,
    random rows of varied sharpness), never a token of zero probability (blocks and tokens
    masked out, targets at 0+ and 1), and a NaN row stays inside the vocabulary."""
    from hpt_dsl.rollout import hf

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, vocab) * torch.linspace(0.5, 8, 64)[:, None], -1)
    probs[:8, : vocab // 2] = 0.0  # whole blocks without mass
    probs[8:16, 1::2] = 0.0  # every other token without mass
    q = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q[16], q[17] = 1.0, 1e-300
    cdf = probs.double().cumsum(-1)
    one_level = torch.searchsorted(cdf, q * cdf[:, -1:]).squeeze(1)
    two_level = hf._inverse_cdf(probs, q)
    assert hf.SAMPLE_BLOCK < vocab
    # the same token, except where the target lies within float64 rounding of the boundary
    # between the two (summation order differs between CPUs, so equality is not asserted)
    target = (q * cdf[:, -1:]).squeeze(1)
    gap = (cdf.gather(1, torch.minimum(two_level, one_level)[:, None]).squeeze(1) - target).abs()
    assert bool(((two_level == one_level) | (gap <= 1e-12 * cdf[:, -1])).all())
    assert (two_level == one_level).sum() >= 60
    assert bool((probs.gather(1, two_level[:, None]) > 0).all())
    nan = hf._inverse_cdf(torch.full((2, vocab), float("nan")), q[:2])
    assert bool(((nan >= 0) & (nan < vocab)).all())
