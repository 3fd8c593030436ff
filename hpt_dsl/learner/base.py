"""The learner interface: log-probs and optimizer updates over a TrainBatch.

Every learner (``torch`` in plain PyTorch, ``deepspeed``) implements ``Learner``; the
training loop only talks to this interface, through ``make_learner``.

What a learner does, per step of the loop:

1. ``logprobs(batch, which)`` — per-token log-probs of the response tokens, no grad, for
   the pi_old pass (``which="policy"``) and the KL reference (``which="ref"``)::

       logprobs[b, t] = log_softmax(logits[b, P - 1 + t] / tau)[response_ids[b, t]]

   with tau = ``settings.rollout.temperature`` (the rollout engines report their
   log-probs with the same tau), zero where ``response_mask`` is 0.
2. ``values(batch)`` — the critic's value per response token (only when the recipe has
   ``adv=gae``), no grad.
3. ``update(batch, program, prep)`` — ONE optimizer step over one optimizer mini-batch:
   the rows are split into micro-batches (gradient accumulation); for each, the forward
   computes log-probs (and entropy / values when needed) and calls
   ``program.loss(prep, logprobs=..., rows=idx, ...)``. ``prep`` holds every normaliser of
   the mini-batch, so the micro-batch losses sum to the full mini-batch loss by
   construction and are back-propagated unscaled. Then gradient clipping, a finiteness
   check (a non-finite loss or grad norm skips the step: no parameter, optimizer or
   scheduler change), the optimizer and scheduler steps.
4. ``named_parameters()`` — the policy's parameters by Hugging Face name, for the weight
   sync to the rollout engine.
5. ``save(dir)`` / ``load(dir)`` — the full learner state (policy, critic, optimizers,
   schedulers) as safetensors + JSON files written into an existing empty directory;
   the caller (``hpt_dsl.checkpoint``) makes the directory appear atomically.
   ``save_pretrained(dir)`` writes the final policy as a Hugging Face checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

    from hpt_dsl.batch import TrainBatch
    from hpt_dsl.estimator.program import LossProgram, Prepared
    from hpt_dsl.recipe import Recipe


@dataclass
class UpdateResult:
    """What one optimizer step reports.

    metrics:   loss terms and estimator statistics (clip fraction, KL, entropy, ...),
               summed over micro-batches for additive terms (the program's own metrics)
    grad_norm: the policy's total gradient norm before clipping
    skipped:   True when the loss or grad norm was not finite and nothing was updated
    """

    metrics: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    skipped: bool = False
    tokens: int = 0


class Learner(ABC):
    """Owns the policy (and the reference model and critic, when the recipe needs them)."""

    model: Any  # the policy, a transformers PreTrainedModel

    @abstractmethod
    def logprobs(self, batch: TrainBatch, which: Literal["policy", "ref"] = "policy") -> Tensor:
        """(B, T) log-probs of the response tokens, no grad; 0 on padding."""

    @abstractmethod
    def values(self, batch: TrainBatch) -> Tensor:
        """(B, T) critic values of the response tokens, no grad; 0 on padding."""

    @abstractmethod
    def update(self, batch: TrainBatch, program: LossProgram, prep: Prepared) -> UpdateResult:
        """One optimizer step over ``batch`` with the compiled loss ``program`` and its
        ``prep`` (the mini-batch's advantages and normalisers)."""

    @abstractmethod
    def named_parameters(self) -> Iterable[tuple[str, Tensor]]:
        """The policy's parameters by Hugging Face name (for weight sync)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the full state into the existing directory ``path``."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore the state written by ``save``."""

    @abstractmethod
    def save_pretrained(self, path: Path) -> None:
        """The policy as a Hugging Face checkpoint (config, safetensors, tokenizer)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (process groups, memory)."""


TOTAL = "\0total"
"""The key under which a learner sums its micro-batch losses next to the metrics (not a metric)."""


def add_metrics(sums: dict[str, Tensor], metrics: dict[str, Tensor]) -> None:
    """``sums[k] += metrics[k]`` in float64, on the metrics' device: an update's micro-batch
    metrics add up there without one host synchronisation per micro-batch or metric."""
    for k, v in metrics.items():
        v = v.detach().double()
        sums[k] = v.clone() if k not in sums else sums[k].add_(v)


def read_metrics(sums: dict[str, Tensor]) -> dict[str, float]:
    """The summed metrics as Python floats, read back in one transfer."""
    if not sums:
        return {}
    import torch

    values = torch.stack([v.reshape(()).double() for v in sums.values()]).tolist()
    return dict(zip(sums, values, strict=True))


def add_prepared_metrics(metrics: dict[str, float], prep: Prepared) -> dict[str, float]:
    """Complete the summed ``loss`` metrics of an update with what ``prep`` knows of the whole
    mini-batch: the per-row shares of batch metrics (over every row, used or not), the
    metric shares of the silent rows (added to the forwarded rows' values of the same name),
    and a loss of exactly 0 for every term when no row was forwarded. The shares are summed
    on the device and read back in one transfer."""
    whole = read_metrics({k: share.sum() for k, share in prep.row_metrics.items()})
    silent = read_metrics({k: share.sum() for k, share in prep.silent_metrics.items()})
    metrics.update(whole)
    for k, v in silent.items():
        metrics[k] = metrics.get(k, 0.0) + v
    for name in ("loss", *(f"loss/{term}" for term in prep.weights)):
        metrics.setdefault(name, 0.0)
    return metrics


def make_learner(recipe: Recipe, model: Any, tokenizer: Any) -> Learner:
    """The learner named by ``recipe.settings.learner.engine``, with a reference model
    only when ``recipe.needs.ref_model`` and a critic only when ``recipe.needs.critic``."""
    name = recipe.settings.learner.engine
    if name == "torch":
        from hpt_dsl.learner.torch import TorchLearner

        return TorchLearner(recipe, model, tokenizer)
    if name == "deepspeed":
        from hpt_dsl.learner import deepspeed  # type: ignore[attr-defined]

        return deepspeed.make_learner(recipe, model, tokenizer)
    raise ValueError(f"unknown learner {name!r}; use 'torch' or 'deepspeed'")
