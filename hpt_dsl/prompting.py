"""Questions become prompt token ids, once, the same way for every engine and the learner.

Three ways, chosen by the model settings:

* ``model.prompt_template`` set: the raw text ``template.format(question=...)`` (for example
  ``"Question: {question}\\nAnswer: Let's think step by step."``), tokenized without
  special tokens added beyond the tokenizer's own BOS handling;
* otherwise the tokenizer's chat template with the question as the user message, after an
  optional ``model.system_prompt`` system message, and the generation prompt appended;
* a tokenizer without a chat template and no prompt template: the question text itself.

``PromptCache`` encodes each question once per run (rollouts, demonstrations and
evaluation all reuse the ids).
"""

from __future__ import annotations

from typing import Any

from hpt_dsl.data.base import Question
from hpt_dsl.settings import ModelSettings


def encode_prompt(tokenizer: Any, text: str, settings: ModelSettings) -> list[int]:
    """Token ids of the prompt for question text ``text``."""
    if settings.prompt_template is not None:
        return list(tokenizer(settings.prompt_template.format(question=text)).input_ids)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if settings.system_prompt:
            messages.append({"role": "system", "content": settings.system_prompt})
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        return list(ids)
    if settings.system_prompt:
        text = settings.system_prompt + "\n" + text
    return list(tokenizer(text).input_ids)


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a demonstration: its text without special tokens, then end-of-sequence
    (the token a rollout ends with when it stops), so the policy learns to stop."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return ids + [int(tokenizer.eos_token_id)]


class PromptCache:
    """question id -> prompt ids (and demonstration ids), encoded on first use."""

    def __init__(self, tokenizer: Any, settings: ModelSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._demos: dict[tuple[str, int], list[int]] = {}

    def prompt(self, q: Question, split: str = "train") -> list[int]:
        key = (split, q.id)
        if key not in self._prompts:
            self._prompts[key] = encode_prompt(self.tokenizer, q.prompt, self.settings)
        return self._prompts[key]

    def demo(self, q: Question, split: str = "train") -> list[int] | None:
        if q.demo is None:
            return None
        key = (split, q.id)
        if key not in self._demos:
            self._demos[key] = encode_response(self.tokenizer, q.demo)
        return self._demos[key]
