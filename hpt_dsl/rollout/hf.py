"""The rollout engine on transformers' ``generate``: batched, KV-cached sampling.

Prompts are left-padded into one batch (chunks of at most ``max_sequences`` sampled
sequences), each repeated ``n`` times, and sampled in one ``generate`` call with a fresh
``GenerationConfig`` (so a checkpoint's own sampling defaults never leak in). The
log-prob of every sampled token is recorded on the fly by a logits processor that runs
before the temperature / top-k / top-p warpers and keeps one step of log-probs::

    logprobs[t] = log_softmax(logits_t / tau)[token_t]

The engine samples with the learner's own model object, so after an update its weights
are already current and ``load_weights`` only copies tensors that are not shared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.batch import pad_left
from hpt_dsl.rollout.base import Rollout, RolloutEngine, SamplingParams
from hpt_dsl.settings import Settings


class _LogprobRecorder:
    """A logits processor that records log_softmax(logits / tau) of each sampled token.

    At step t it sees the token sampled at step t - 1 as the last column of ``input_ids``
    and reads its log-prob from the previous step's distribution; ``finish`` reads the
    last one. Only one step of (B, V) log-probs is held at a time.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.prev: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """(B, steps) log-probs, given the tokens sampled at the last step."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
            self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(0, 0)


class HFRolloutEngine(RolloutEngine):
    """Samples with ``model.generate``; shares the model with the torch learner."""

    max_sequences = 512  # sampled sequences per generate call (memory bound)

    def __init__(self, model: Any, tokenizer: Any, settings: Settings | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        per_call = max(1, self.max_sequences // params.n)
        out: list[Rollout] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            for r in self._generate(chunk, params, seed=params.seed + start):
                out.append(Rollout(r.prompt_index + start, r.token_ids, r.logprobs, r.finish_reason))
        return out

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Rollout]:
        from transformers import GenerationConfig, LogitsProcessorList

        ids, mask = pad_left(prompts, self.pad_id)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        greedy = params.top_k == 1
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=params.top_p,  # explicit: None would mean transformers' default (top_k=50)
            top_k=params.top_k,  # 0 = no top-k filtering
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        recorder = _LogprobRecorder(params.temperature)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                seqs = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([recorder]),
                )
        finally:
            self.model.train(was_training)
        new = seqs[:, ids.shape[1] :].cpu()
        logprobs = recorder.finish(new[:, -1].to(device)).cpu() if new.shape[1] else torch.zeros(len(new), 0)
        rollouts = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            end, reason = len(tokens), "length"
            for t, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    end, reason = t + 1, "stop"
                    break
            rollouts.append(
                Rollout(
                    prompt_index=row // params.n,
                    token_ids=tuple(tokens[:end]),
                    logprobs=tuple(logprobs[row, :end].tolist()),
                    finish_reason=reason,  # type: ignore[arg-type]
                )
            )
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)
