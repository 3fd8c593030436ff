"""TRL: a ``GRPOTrainer`` whose loss is a compiled hpt-dsl recipe.

    from hpt_dsl.integrations.trl import HptGRPOTrainer
    trainer = HptGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                             recipe="loss = if acc > 0 then grpo else 0")
    trainer.train()

TRL samples, scores and batches as usual; the recipe replaces TRL's loss (``loss_type``,
``epsilon``, ``scale_rewards``' advantages and the KL term) and its advantages. Once per
generation batch (one optimizer step), over the rows of every process,

    prep = program.prepare(response_mask, rewards R_i, group_ids g_i, [old_logprobs], [ref_logprobs])

with R_i = sum_f w_f r_{f,i} (TRL's ``reward_weights``; a reward function that returns None
counts 0) and g_i the prompt each completion was sampled from. Each micro-batch's loss is
then ``program.loss(prep, rows)``: the losses of an optimizer step's micro-batches add up to
the recipe's loss over the whole step, so normalisers (token and sequence counts, gate
shares, group statistics) span the step, never a micro-batch. Every process holds its own
rows; its loss is multiplied by the number of processes because DDP averages gradients.

The recipe's metrics are logged as ``hpt/<name>`` (summed over the step's micro-batches and
processes, as ``LossProgram.loss`` defines them).

Limits (each raises ``IntegrationError`` with what to do instead):
- rollouts only: TRL's batches hold no demonstration rows, so ``on=demos``,
  ``on=rollouts+demos`` and ``group=rollouts+demos`` cannot run; ``adv=gae`` needs a critic;
- ``steps_per_generation`` must equal ``gradient_accumulation_steps`` (TRL's default): one
  generation batch is one optimizer step, the scope of the recipe's normalisers;
- a recipe ``kl=`` term needs ``beta != 0`` (TRL then loads the reference model; the recipe's
  coefficient and estimator are used, not TRL's), and ``beta != 0`` needs a ``kl=`` term;
- TRL options that modify its own loss are refused, since the recipe replaces that loss:
  ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, ``delta``, ``entropy_coef`` /
  adaptive entropy (write ``entropy=`` in the recipe), ``importance_sampling_level="sequence"``
  (write ``denom=pi_old_seq``), vLLM's importance-sampling correction, and
  ``multi_objective_aggregation="normalize_then_sum"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer

from hpt_dsl.estimator.program import Prepared
from hpt_dsl.integrations.common import (
    IntegrationError,
    RecipeLike,
    compile_program,
    demo_problems,
    raise_problems,
)

__all__ = ["HptGRPOTrainer", "IntegrationError"]

ROW = "hpt_row"
"""The key of each completion's row index in the generation batch (it follows TRL's shuffling
and splitting of the batch into micro-batches)."""

MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip
"""Batch fields TRL's forward pass takes besides the token ids (vision models)."""


class HptGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the loss of a compiled hpt-dsl recipe.

    Takes every argument of ``GRPOTrainer`` and ``recipe``: recipe text (an estimator line or
    a whole recipe), a ``.hpt`` path, a checked ``Recipe`` or a ``LossProgram``.
    """

    def __init__(self, *args: Any, recipe: RecipeLike, **kwargs: Any) -> None:
        self.hpt = compile_program(recipe)
        what = "this recipe cannot run in TRL's GRPOTrainer"
        raise_problems(demo_problems(self.hpt, "TRL") + _critic_problems(self.hpt), what)
        super().__init__(*args, **kwargs)
        raise_problems(self._config_problems(), what)
        self._hpt_prep: dict[str, Prepared] = {}
        self._hpt_rewards: Tensor | None = None
        self._hpt_sums: dict[str, dict[str, Tensor]] = {"train": {}, "eval": {}}

    def _config_problems(self) -> list[str]:
        """The GRPOConfig settings that contradict the recipe or change TRL's own loss."""
        a, out = self.args, []
        has_kl = any(t.spec.kl is not None for t in self.hpt.terms)
        if has_kl and self.beta == 0.0:
            out.append("the recipe has a kl= term: set GRPOConfig(beta=...) non-zero so that TRL loads the "
                       "reference model (the recipe's coefficient is the one used)")  # fmt: skip
        if not has_kl and self.beta != 0.0:
            out.append(f"beta={self.beta} asks for a KL term the recipe does not have: add kl=k3({self.beta}) "
                       "to the recipe, or set beta=0.0")  # fmt: skip
        if a.steps_per_generation != a.gradient_accumulation_steps:
            out.append(f"steps_per_generation={a.steps_per_generation} differs from gradient_accumulation_steps="
                       f"{a.gradient_accumulation_steps}: the recipe normalises over one optimizer step, which must "
                       "be one generation batch")  # fmt: skip
        refused = {
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "delta": a.delta is not None,
            "entropy_coef / adaptive entropy (write entropy=<coef> in the recipe)": self._entropy_bonus_enabled,
            "importance_sampling_level='sequence' (write denom=pi_old_seq in the recipe)":
                self.importance_sampling_level != "token",
            "vllm_importance_sampling_correction": self.use_vllm and self.vllm_importance_sampling_correction,
            "multi_objective_aggregation='normalize_then_sum'":
                self.multi_objective_aggregation != "sum_then_normalize",
        }  # fmt: skip
        out += [f"{name} changes TRL's own loss, which the recipe replaces: leave it at its default"
                for name, on in refused.items() if on]  # fmt: skip
        return out

    # ----- once per generation batch -------------------------------------------------------

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Tensor:
        """TRL's rewards (N, F) over every process's completions, kept for the recipe's prepare."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._hpt_rewards = rewards
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation batch, plus the recipe's ``prepare`` over the rows of all processes
        (kept for this batch's micro-batches) and each row's index in it."""
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        assert self._hpt_rewards is not None
        per_func = self._hpt_rewards
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        n = self.num_generations if mode == "train" else self.num_generations_eval
        group = torch.arange(rewards.shape[0], device=rewards.device) // n
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        rows, width = mask.shape

        def everyone(x: Tensor) -> Tensor:
            return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1))

        old, ref = out.get("old_per_token_logps"), out.get("ref_per_token_logps")
        prep = self.hpt.prepare(
            response_mask=everyone(mask) != 0, rewards=rewards, group_ids=group,
            old_logprobs=None if old is None else everyone(old), ref_logprobs=None if ref is None else everyone(ref),
            step=self.state.global_step, old_is_current=old is None,
        )  # fmt: skip
        start = self.accelerator.process_index * rows
        self._hpt_prep[mode] = prep.local(slice(start, start + rows), width)
        out[ROW] = torch.arange(rows, device=mask.device)
        return out

    # ----- once per micro-batch ------------------------------------------------------------

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor:
        """The recipe's loss of this micro-batch's rows (its share of the step's loss)."""
        if return_outputs:
            raise ValueError("HptGRPOTrainer does not return model outputs")
        mode = "train" if self.model.training else "eval"
        prep = self._hpt_prep[mode]
        completion_ids = inputs["completion_ids"]
        lp, entropy, aux = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in MODEL_INPUTS},
        )
        rows = inputs[ROW]
        out = self.hpt.loss(prep, logprobs=lp, rows=rows, entropy=entropy)
        loss = out.loss * self.accelerator.num_processes
        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.router_aux_loss_coef * aux / accumulation
        self._hpt_log(mode, out.metrics, prep, rows)
        return loss

    def _hpt_log(self, mode: str, metrics: dict[str, Tensor], prep: Prepared, rows: Tensor) -> None:
        """Add this micro-batch's metrics (and those of its silent rows) to the step's sums;
        at the step's last micro-batch, sum over processes and log them as ``hpt/<name>``."""
        sums = self._hpt_sums[mode]
        parts = [(k, v) for k, v in metrics.items()] + [(k, v[rows].sum()) for k, v in prep.silent_metrics.items()]
        for k, v in parts:
            v = v.detach().float()
            sums[k] = v if k not in sums else sums[k] + v
        if mode == "eval" or self.accelerator.sync_gradients:
            keys = sorted(sums)
            if keys:
                totals = self.accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
                for k, v in zip(keys, totals.tolist(), strict=True):
                    self._metrics[mode][f"hpt/{k}"].append(v)
            sums.clear()


def _critic_problems(program: Any) -> list[str]:
    """Terms that need a critic (adv=gae), which TRL's GRPO does not train."""
    return [f"term `{t.name}` uses adv=gae, which needs a critic that TRL's GRPOTrainer does not train"
            for t in program.terms if t.spec.adv.name == "gae"]  # fmt: skip
