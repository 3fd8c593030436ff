"""verl: a compiled hpt-dsl recipe as a verl policy loss (and advantage estimator), selected
by name in verl's config.

    from hpt_dsl.integrations.verl import register
    register("mask=dual_clip(0.2, 0.28, 3) denom=pi_old adv=group_norm grad=loglik agg=token_mean",
             name="hpt_dapo")
    # verl config: actor_rollout_ref.actor.policy_loss.loss_mode=hpt_dapo
    #              algorithm.adv_estimator=hpt_dapo           (the recipe's advantage)

``register`` puts the recipe into verl's own registries (``register_policy_loss`` and
``register_adv_est`` in ``verl.trainer.ppo.core_algos``), so ``get_policy_loss_fn(name)``
returns it wherever verl looks a loss up. The policy loss has verl's signature

    loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        -> (loss, metrics)

and computes, on verl's micro-batch, the recipe's token objective J (its mask, denominator,
likelihood gradient) with verl's ``advantages`` as A and ``rollout_is_weights`` (when given)
as per-token weights, aggregated by the recipe's ``agg``. verl normalises over the global
mini-batch (``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``,
``global_batch_size``); the micro-batch mean is rescaled to that scope:

    token_mean:                      loss * n_tok / batch_num_tokens * dp_size
    seq_mean_token_{mean,sum}, token_sum_norm(L):   loss * n_seq / global_batch_size * dp_size

(n_tok, n_seq the micro-batch's response tokens and non-empty rows), which is verl's own
``agg_loss`` convention. ``loss_agg_mode`` must name the recipe's aggregation (token-mean,
seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm); ``token_sum_norm(L)`` uses
the recipe's L (verl's ``loss_scale_factor`` is not read). The recipe's clip ranges are used;
verl's ``clip_ratio*`` settings are not read by this loss.

The advantage estimator (registered for any ``adv`` but ``gae``: use verl's ``gae`` with a
critic) computes the recipe's advantage from verl's ``token_level_rewards`` (R_i = sum over the
row) and ``index`` (the prompt uid: the groups), over the whole step's batch, as hpt-dsl does.

What verl's policy loss cannot get, and so cannot be registered (``IntegrationError``):
- gates on per-question statistics (``acc``, ``solved``, ``reward_mean``, ``n``, ...) or on
  ``step``, and per-question aggregation: verl passes neither rewards, groups nor the step;
- demonstrations (``on=demos``, ``group=rollouts+demos``): verl's batches hold rollouts;
- a ``kl=`` term or an entropy bonus: verl adds them itself (``actor.use_kl_loss``,
  ``kl_loss_coef``, ``kl_loss_type=low_var_kl`` for k3; ``actor.entropy_coeff``);
- terms with different advantages or aggregations: verl passes one advantage tensor and one
  ``loss_agg_mode``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from verl.trainer.ppo import core_algos

from hpt_dsl.estimator.compile import LossProgram
from hpt_dsl.integrations.common import (
    IntegrationError,
    RecipeLike,
    compile_program,
    demo_problems,
    raise_problems,
)

__all__ = ["IntegrationError", "policy_loss", "advantage_estimator", "register"]

AGG_MODES = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "token_sum_norm",
}
"""verl's ``loss_agg_mode`` -> the hpt-dsl aggregation that computes it."""


def problems(program: LossProgram) -> list[str]:
    """Why ``program`` cannot be a verl policy loss (empty when it can)."""
    out = demo_problems(program, "verl")
    if program.stats_used:
        out.append(f"the loss reads {sorted(program.stats_used)} (gates on per-question statistics or the step), "
                   "which verl's policy loss does not get")  # fmt: skip
    for t in program.terms:
        s = t.spec
        if t.scope.per_question:
            out.append(f"term `{t.name}` weighs questions equally (per question), which needs the groups")
        if s.kl is not None:
            out.append(f"term `{t.name}` has kl={s.kl.name}: verl adds the KL loss itself "
                       "(actor.use_kl_loss=True, actor.kl_loss_coef, actor.kl_loss_type)")  # fmt: skip
        if s.entropy or s.ent_weight is not None:
            out.append(f"term `{t.name}` has an entropy bonus: verl adds it itself (actor.entropy_coeff)")
        if s.agg.name not in AGG_MODES.values():
            out.append(f"term `{t.name}` aggregates with {s.agg.name}, which no verl loss_agg_mode names")
    if len({t.spec.adv for t in program.terms}) > 1:
        out.append("the terms use different advantages; verl passes one advantage tensor")
    if len({t.spec.agg for t in program.terms}) > 1:
        out.append("the terms aggregate differently; verl passes one loss_agg_mode")
    return out


def _checked(recipe: RecipeLike) -> LossProgram:
    program = compile_program(recipe)
    raise_problems(problems(program), "this recipe cannot be a verl policy loss")
    if not program.terms:
        raise IntegrationError("this recipe has no estimator term: its loss is 0")
    return program


def _info(config: Any) -> dict[str, Any]:
    """verl's ``config.global_batch_info`` (a dict on ActorConfig, a mapping in a DictConfig)."""
    info = getattr(config, "global_batch_info", None) if config is not None else None
    return dict(info) if info else {}


def _scope(agg: str, mask: Tensor, info: dict[str, Any]) -> Tensor | float:
    """The factor from the micro-batch's normaliser to verl's global one (see the module doc)."""
    dp = int(info.get("dp_size") or 1)
    if agg == "token_mean":
        total, local = info.get("batch_num_tokens"), mask.sum()
    else:
        total, local = info.get("global_batch_size"), (mask.sum(dim=-1) > 0).sum()
    if total is None:
        if dp > 1:
            raise IntegrationError("verl runs data parallel but passed no global batch size or token count")
        return 1.0
    return local.to(torch.float64) * dp / float(total)


def policy_loss(recipe: RecipeLike) -> Any:
    """A function with verl's policy-loss signature computing ``recipe`` (see the module doc)."""
    program = _checked(recipe)
    agg = program.terms[0].spec.agg.name

    def loss_fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, dict[str, Any]]:
        if AGG_MODES.get(loss_agg_mode) != agg:
            want = next((k for k, v in AGG_MODES.items() if v == agg), agg)
            raise IntegrationError(f"verl's loss_agg_mode is {loss_agg_mode!r} but the recipe aggregates with "
                                   f"{agg}: set actor.loss_agg_mode={want}")  # fmt: skip
        mask = response_mask.bool()
        B = mask.shape[0]
        prep = program.prepare(
            response_mask=mask, old_logprobs=old_log_prob,
            rewards=torch.zeros(B, dtype=log_prob.dtype, device=mask.device),
            group_ids=torch.arange(B, device=mask.device),
        )  # fmt: skip
        adv = advantages.detach().to(log_prob.dtype)
        prep.adv = [adv for _ in prep.adv]  # verl's advantages are A
        if rollout_is_weights is not None:
            prep.tis = rollout_is_weights.detach()
        out = program.loss(prep, logprobs=log_prob)
        loss = out.loss * _scope(agg, mask, _info(config))
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            metrics = {
                "actor/pg_clipfrac": float(out.metrics.get("clip_frac", torch.zeros(()))),
                "actor/ppo_kl": float(((old_log_prob - log_prob) * mask).sum() / n),
            }
            metrics.update({f"actor/hpt/{k}": float(v) for k, v in out.metrics.items() if not k.startswith("adv_")})
        return loss.to(log_prob.dtype), metrics

    loss_fn.__name__ = "hpt_policy_loss"
    loss_fn.__doc__ = f"verl policy loss of the hpt-dsl recipe {program!r}."
    return loss_fn


def advantage_estimator(recipe: RecipeLike) -> Any:
    """A verl advantage estimator computing the recipe's ``adv`` (any but ``gae``)."""
    program = _checked(recipe)
    spec = program.terms[0].spec
    if spec.adv.name == "gae":
        raise IntegrationError("adv=gae is verl's own estimator: set algorithm.adv_estimator=gae (with a critic)")

    def adv_fn(
        token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None, **_: Any
    ) -> tuple[Tensor, Tensor]:
        mask = response_mask.bool()
        B = mask.shape[0]
        if index is None:
            group = torch.arange(B, device=mask.device)
        else:
            group = torch.as_tensor(np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1),
                                    device=mask.device)  # fmt: skip
        rewards = token_level_rewards.sum(dim=-1)
        prep = program.prepare(response_mask=mask, rewards=rewards, group_ids=group, old_is_current=True)
        adv = prep.adv[0]
        adv = (adv if adv.shape[1] > 1 else adv.expand_as(token_level_rewards)) * response_mask
        adv = adv.to(token_level_rewards.dtype)
        return adv, adv

    adv_fn.__name__ = "hpt_advantage"
    return adv_fn


def register(recipe: RecipeLike, name: str) -> str:
    """Register ``recipe`` in verl as the policy loss ``name`` (``actor.policy_loss.loss_mode``)
    and, unless its advantage is gae, as the advantage estimator ``name``
    (``algorithm.adv_estimator``). Returns ``name``."""
    program = _checked(recipe)
    if name in core_algos.POLICY_LOSS_REGISTRY:
        raise IntegrationError(f"verl already has a policy loss named {name!r}; choose another name")
    core_algos.register_policy_loss(name)(policy_loss(program))
    if program.terms[0].spec.adv.name != "gae":
        core_algos.register_adv_est(name)(advantage_estimator(program))
    return name
