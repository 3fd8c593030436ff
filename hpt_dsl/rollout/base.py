"""The rollout engine interface: prompts in, sampled responses with their log-probs out.

Every engine (``hf``, a KV-cached sampling loop on the transformers model; ``vllm``, an
in-process vLLM engine; ``vllm_server``, a remote vLLM server) implements ``RolloutEngine``.
The training loop only ever talks to this interface, through ``make_rollout_engine``.

Conventions every engine keeps:

* Prompts are token ids, already templated by ``hpt_dsl.prompting`` (the learner sees the
  very same ids). Engines never re-tokenize text.
* ``generate(prompts, params)`` returns ``len(prompts) * params.n`` rollouts, ordered by
  prompt then sample: rollout ``i * n + j`` is sample ``j`` of prompt ``i``.
* ``token_ids`` are the generated tokens only (no prompt, no padding). When generation
  stopped on the end-of-sequence token, that token is the last entry and
  ``finish_reason == "stop"``; when it hit ``max_new_tokens``, ``finish_reason == "length"``.
* ``logprobs[t]`` is the log-probability of ``token_ids[t]`` under the sampling policy at
  temperature tau, *before* top-p / top-k renormalisation::

      logprobs[t] = log_softmax(logits_t / tau)[token_ids[t]]

  The learner computes its log-probs with the same temperature, so with top_p = 1 and
  top_k = 0 the two agree up to kernel differences. With top-p / top-k the engine samples
  from a renormalised distribution that these numbers do not describe; that mismatch is
  what ``rollout.tis_cap`` corrects.
* ``params.seed`` makes a call reproducible: the same weights, prompts and params give the
  same rollouts.
* ``load_weights(named_tensors)`` receives the learner's parameters by their Hugging Face
  names (as in ``model.named_parameters()``) after every update and after a resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

    from hpt_dsl.settings import Settings

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: n responses per prompt at temperature / top-p / top-k."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    max_new_tokens: int = 64
    seed: int = 0
    first_prompt: int | None = None
    """None: the call's own prompts (every process that makes it passes the same ones). An
    index: the prompts are this process's share of a step's, the first being the step's prompt
    ``first_prompt``; a ``prompt_seeded`` engine seeds each prompt by its index in the step."""

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


@dataclass(frozen=True)
class Rollout:
    """One sampled response to ``prompts[prompt_index]``."""

    prompt_index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason


class RolloutEngine(ABC):
    """Samples responses from the current policy."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """``len(prompts) * params.n`` rollouts, ordered by prompt then sample."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the learner's parameters (Hugging Face names) into the engine's model."""

    @property
    def lockstep(self) -> bool:
        """True when every process must make the same ``generate`` calls, because each forward
        pass needs all of them (the ``hf`` engine on a ZeRO-3 model over several processes)."""
        return False

    @property
    def prompt_seeded(self) -> bool:
        """True when a prompt's samples depend on the call's seed and the prompt's index in the
        step only, not on the process that draws them (``SamplingParams.first_prompt``): the
        loop then gives every process the same seed (the vLLM engine; see
        ``hpt_dsl.rollout.colocate``)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release the engine's resources (memory, processes)."""


def make_rollout_engine(settings: Settings, model: Any, tokenizer: Any) -> RolloutEngine:
    """The engine named by ``settings.rollout.engine``.

    ``model`` is the learner's policy module (the ``hf`` engine shares or copies it; the
    ``vllm`` engine loads the same checkpoint into its own runtime).
    """
    name = settings.rollout.engine
    if name == "hf":
        from hpt_dsl.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, settings)
    if name == "vllm":
        from hpt_dsl.rollout import vllm  # type: ignore[attr-defined]

        return vllm.make_engine(settings, model, tokenizer)
    if name == "vllm_server":
        from hpt_dsl.rollout import server

        return server.make_engine(settings, model, tokenizer)
    raise ValueError(f"unknown rollout engine {name!r}; use 'hf', 'vllm' or 'vllm_server'")
