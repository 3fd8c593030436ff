"""Evaluation: k samples per question, scored by the reward, summarised as avg@k and pass@k.

For a question with n samples of which c are correct (reward >= 0.5):

    avg@n   = mean over questions of (mean reward of its n samples)
    pass@k  = mean over questions of 1 - C(n - c, k) / C(n, k)        (k <= n)

The pass@k estimator is the unbiased one of Chen et al. (2021): the chance that at least
one of k samples drawn without replacement from the n is correct. It is computed as the
stable product ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``.

``evaluate(engine, tokenizer, questions, reward_fn, k, params)`` is what ``hpt-dsl eval``
and the training loop's periodic evaluation both call; ``evaluate_model(model, data, ...)``
is ``hpt-dsl eval`` itself: it loads the model (a run folder prompted as its run was), the
benchmark files and the reward, then evaluates every benchmark.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpt_dsl import hub
from hpt_dsl.data.base import Question, RewardFn
from hpt_dsl.data.files import load_benchmarks
from hpt_dsl.data.verify import make_reward, score_batch
from hpt_dsl.prompting import PromptCache
from hpt_dsl.rollout.base import RolloutEngine, SamplingParams, make_rollout_engine
from hpt_dsl.settings import DataSettings, ModelSettings, RolloutSettings, Settings

CORRECT = 0.5
"""A sample counts as correct for pass@k when its reward is at least this."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def report_ks(n: int) -> list[int]:
    """The k of pass@k to report for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def summarize(rewards: Sequence[Sequence[float]]) -> dict[str, Any]:
    """avg@n and pass@k (k in ``report_ks(n)``) from per-question rewards (n each)."""
    if not rewards:
        raise ValueError("no questions to summarise")
    n = len(rewards[0])
    if n == 0 or any(len(r) != n for r in rewards):
        raise ValueError("every question needs the same number (>= 1) of samples")
    correct = [sum(x >= CORRECT for x in r) for r in rewards]
    out: dict[str, Any] = {"questions": len(rewards), "k": n}
    out[f"avg@{n}"] = sum(sum(r) / n for r in rewards) / len(rewards)
    for k in report_ks(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rewards)
    out["correct"] = correct
    return out


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    questions: Sequence[Question],
    reward_fn: RewardFn,
    k: int,
    params: SamplingParams,
    encode: Callable[[Question], list[int]] | None = None,
    batch_questions: int = 16,
) -> dict[str, Any]:
    """Sample k responses per question, score them, summarise (see the module docstring).

    ``encode`` turns a question into prompt token ids (default: the tokenizer's chat
    template with the question as the user message). Returns ``summarize``'s dict plus
    ``mean_response_tokens``, ``truncated`` (share of samples that hit max_new_tokens),
    ``seconds``, ``tokens_per_s`` (generated tokens per second of generation) and
    ``samples_per_s`` (end to end, scoring included).
    """
    if not questions:
        raise ValueError("no questions to evaluate")
    encode = encode or (lambda q: default_encode(tokenizer, q))
    sampling = replace(params, n=k)
    rewards: list[list[float]] = []
    tokens = truncated = 0
    gen_seconds = 0.0
    start = time.perf_counter()
    for lo in range(0, len(questions), batch_questions):
        chunk = questions[lo : lo + batch_questions]
        t0 = time.perf_counter()
        rollouts = engine.generate([encode(q) for q in chunk], replace(sampling, seed=params.seed + lo))
        gen_seconds += time.perf_counter() - t0
        texts = [tokenizer.decode(list(r.token_ids), skip_special_tokens=True) for r in rollouts]
        answers = [chunk[r.prompt_index].answer for r in rollouts]
        scores = score_batch(reward_fn, texts, answers)
        rewards += [scores[i * k : (i + 1) * k] for i in range(len(chunk))]
        tokens += sum(len(r.token_ids) for r in rollouts)
        truncated += sum(r.finish_reason == "length" for r in rollouts)
    seconds = time.perf_counter() - start
    out = summarize(rewards)
    samples = len(questions) * k
    out.update(
        mean_response_tokens=tokens / samples,
        truncated=truncated / samples,
        seconds=seconds,
        tokens_per_s=tokens / gen_seconds if gen_seconds > 0 else 0.0,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
    )
    return out


def default_encode(tokenizer: Any, question: Question) -> list[int]:
    """The question as the only user message of the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# ----- hpt-dsl eval ----------------------------------------------------------------------------

NOTE = "Scores of the model as given on these sets; no checkpoint was selected by them."


def trained_settings(model: str) -> dict[str, Any] | None:
    """The settings a run folder was trained with (``run.json``), or None for a plain model."""
    run_json = Path(model).expanduser() / "run.json"
    if not run_json.is_file():
        return None
    try:
        return json.loads(run_json.read_text()).get("settings")
    except (OSError, json.JSONDecodeError):
        return None


def default_results_path(model: str) -> Path:
    """Where ``hpt-dsl eval`` writes its results: RUN/eval.json for a run folder, else
    eval-MODEL.json."""
    if trained_settings(model) is not None:
        return Path(model) / "eval.json"
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(model).name or model)}.json")


def model_settings(
    model: str, system_prompt: str | None = None, prompt_template: str | None = None, dtype: str | None = None
) -> ModelSettings:
    """The model settings of an evaluation: a run folder's (how its run prompted), the model
    resolved to a checkpoint (``hpt_dsl.hub.resolve``), and the options given (None: keep)."""
    fields = dict((trained_settings(model) or {}).get("model", {}))
    fields["name"] = hub.resolve(model)
    given = {"system_prompt": system_prompt, "prompt_template": prompt_template, "dtype": dtype}
    fields.update({key: value for key, value in given.items() if value is not None})
    return ModelSettings(**fields)


def evaluate_model(
    model: str,
    data: Sequence[str],
    *,
    k: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    engine: str = "hf",
    reward: str = "math_verify",
    reward_timeout: float = 5.0,
    max_questions: int | None = None,
    question_key: str | None = None,
    answer_key: str | None = None,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    dtype: str | None = None,
    batch: int = 64,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``hpt-dsl eval``: k samples per question of every benchmark in the ``data`` files (a
    file with a ``data_source`` column is one benchmark per source), avg@k and pass@k each.

    ``model`` is a checkpoint folder, a hub name, an alias or a run folder (its final model,
    prompted as the run's settings say); ``progress`` hears a line before each benchmark.
    Returns the results: model, checkpoint, prompt, sampling, reward, note and one
    ``evaluate`` summary per benchmark.
    """
    settings = Settings(
        model=model_settings(model, system_prompt, prompt_template, dtype),
        data=DataSettings(reward=reward, reward_timeout=reward_timeout, max_test=max_questions,
                          question_key=question_key, answer_key=answer_key),
        rollout=RolloutSettings(engine=engine, max_new_tokens=max_new_tokens),
    )
    benchmarks: dict[str, list[Any]] = {}
    for path in data:
        for name, questions in load_benchmarks(path, settings.data).items():
            while name in benchmarks:
                name += "'"
            benchmarks[name] = questions
    reward_fn = make_reward(settings.data)
    net, tokenizer = hub.load_pretrained(settings.model)
    rollout = make_rollout_engine(settings, net, tokenizer)
    prompts = PromptCache(tokenizer, settings.model)
    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    out: dict[str, Any] = {}
    try:
        for name, questions in benchmarks.items():
            if progress is not None:
                progress(f"{name}: {len(questions)} questions x {k} samples ...")
            out[name] = evaluate(rollout, tokenizer, questions, reward_fn, k, params,
                                 encode=lambda q, split=name: prompts.prompt(q, split), batch_questions=batch)
    finally:
        rollout.close()
        close = getattr(reward_fn, "close", None)
        if callable(close):
            close()
    return {
        "model": model,
        "checkpoint": settings.model.name,
        "prompt": settings.model.model_dump(include={"system_prompt", "prompt_template"}),
        "sampling": {"k": k, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                     "seed": seed, "engine": engine},
        "reward": reward,
        "note": NOTE,
        "benchmarks": out,
    }
