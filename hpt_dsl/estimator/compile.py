"""The compiler: a checked Recipe becomes a LossProgram, a pure function over tensors.

    program = compile_recipe(recipe)
    prep = program.prepare(rewards=..., group_ids=..., response_mask=..., is_demo=..., ...)
    for rows in micro_batches:                       # any split of range(B)
        out = program.loss(prep, logprobs=lp[rows], rows=rows)
        out.loss.backward()                          # sum over micro-batches == full-batch loss

``prepare`` is the global pass over the whole optimizer mini-batch (no gradient): the
per-question statistics, each term's gate weight per row, its advantages and its token
coefficients  c_{i,t} = w_i * a_{i,t}  (gate weight times aggregation weight, with the
normalisers counted over the whole mini-batch). ``loss`` is then, per term k,

    loss_k = sum_{i in rows, t} c^k_{i,t} * l^k_{i,t},    l = mask(denom, adv, grad) + kl - entropy

so it is additive over micro-batches by construction. Metrics are built the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.estimator import adv as _adv  # noqa: F401  (registers the components)
from hpt_dsl.estimator import agg as _agg  # noqa: F401
from hpt_dsl.estimator import denom as _denom  # noqa: F401
from hpt_dsl.estimator import grad as _grad  # noqa: F401
from hpt_dsl.estimator import mask as _mask  # noqa: F401
from hpt_dsl.estimator import regularize
from hpt_dsl.estimator.adv import AdvInputs, gae_returns
from hpt_dsl.estimator.denom import TokenInputs
from hpt_dsl.estimator.gate import Branch, WeightFn, flatten, merged
from hpt_dsl.estimator.registry import lookup
from hpt_dsl.estimator.stats import question_stats
from hpt_dsl.recipe import EstimatorSpec, LossExpr, Needs, Recipe, Stat, Term
from hpt_dsl.settings import CriticSettings, Settings

GROUP_ADVS = ("group_norm", "group_mean", "rloo")


@dataclass(frozen=True)
class CompiledTerm:
    """One estimator with its components looked up in the registry."""

    name: str
    spec: EstimatorSpec
    weight: WeightFn
    denom: Callable[..., Any]
    mask: Callable[..., Any]
    shape: Callable[[Tensor], Tensor]
    adv: Callable[..., Any]
    agg: Callable[..., Any]
    kl: Callable[[Tensor], Tensor] | None

    def token_loss(
        self, t: TokenInputs, ref: Tensor | None, entropy: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(l, clipped, rho, kl) for one micro-batch; l is the per-token loss."""
        lik = self.denom(t)
        loss, clipped = self.mask(t, lik, self.shape, *self.spec.mask.args)
        kl = None
        if self.kl is not None and self.spec.kl is not None:
            kl = self.kl(regularize.log_ratio(t.lp, ref, t.mask))  # type: ignore[arg-type]
            loss = loss + self.spec.kl.args[0] * kl
        if self.spec.entropy:
            loss = loss - self.spec.entropy * entropy  # type: ignore[operator]
        return loss, clipped, lik.rho, kl


@dataclass
class Prepared:
    """The global pass over one optimizer mini-batch (see LossProgram.prepare).

    coef[k]: (B, T) c^k = w * a (gate weight times aggregation weight, TIS folded in);
    adv[k]: (B, 1) or (B, T) advantages;  tok[k]: (B, T) unweighted token-mean weights of
    term k's active tokens (for metrics);  row_metrics: name -> (B,) per-row shares of
    batch-level metrics (summing the shares of all rows gives the value).
    """

    response_mask: Tensor
    coef: list[Tensor]
    adv: list[Tensor]
    tok: list[Tensor]
    live: list[bool]
    shares: dict[str, list[float]]
    row_metrics: dict[str, Tensor]
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_is_current: bool = False
    returns: Tensor | None = None
    old_values: Tensor | None = None
    value_coef: Tensor | None = None
    tis: tuple[Tensor, Tensor, float] | None = None  # (rollout_logprobs, rollout tokens, cap), live
    stats: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])


@dataclass
class LossOutput:
    """loss: the policy loss of these rows (0-d, with gradient); value_loss: the clipped critic
    loss (adv=gae with ``values`` passed) or None; metrics: additive over micro-batches."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    value_loss: Tensor | None = None


Rows = Tensor | slice | None


class LossProgram:
    """A compiled recipe: ``prepare`` once per optimizer mini-batch, ``loss`` per micro-batch."""

    def __init__(
        self,
        terms: list[CompiledTerm],
        branches: list[Branch],
        settings: Settings,
        needs: Needs,
        stats_used: set[str],
    ) -> None:
        self.terms = terms
        self.branches = branches
        self.settings = settings
        self.needs = needs
        self.stats_used = stats_used

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.name}: {t.spec.components()}" for t in self.terms)
        return f"LossProgram({parts})"

    # ----- what must be passed -------------------------------------------------------------

    def required_inputs(self) -> dict[str, str]:
        """name -> description of every input ``prepare`` needs for this program."""
        need: dict[str, str] = {}
        specs = [t.spec for t in self.terms]
        per_question = bool(self.stats_used - {"step"})
        if per_question or any(s.adv.name not in ("const",) for s in specs):
            need["rewards"] = "one scalar reward per row, shape (B,)"
        if per_question or any(s.adv.name in GROUP_ADVS for s in specs):
            need["group_ids"] = "the integer question id of each row, shape (B,)"
        if any(s.on != "rollouts" or s.group != "rollouts" for s in specs):
            need["is_demo"] = "True on demonstration rows, shape (B,)"
        if any(s.denom in ("pi_old", "pi_old_seq") or s.mask.name == "seq_clip" for s in specs):
            need["old_logprobs"] = "log pi_old of the taken tokens, shape (B, T)"
        if any(s.kl is not None for s in specs):
            need["ref_logprobs"] = "log pi_ref of the taken tokens (frozen reference model), shape (B, T)"
        if any(s.adv.name == "gae" for s in specs):
            need["values"] = "the critic's values of the response tokens, shape (B, T)"
        return need

    def _missing(self, given: dict[str, Any], names: dict[str, str]) -> None:
        missing = [f"  {k}: {v}" for k, v in names.items() if given.get(k) is None]
        if missing:
            raise ValueError("this estimator needs inputs that were not passed:\n" + "\n".join(missing))

    # ----- the global pass ---------------------------------------------------------------

    def prepare(
        self,
        *,
        response_mask: Tensor,
        rewards: Tensor | None = None,
        group_ids: Tensor | None = None,
        is_demo: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        values: Tensor | None = None,
        rollout_logprobs: Tensor | None = None,
        step: int = 0,
        old_is_current: bool = False,
    ) -> Prepared:
        """Everything that needs the whole optimizer mini-batch, computed once, without gradient.

        ``old_is_current=True`` says the data is on-policy and pi_old is the current policy
        (one update epoch): the ratio's denominator is then the detached ``logprobs`` of each
        micro-batch and ``old_logprobs`` need not be passed.
        """
        need = self.required_inputs()
        if old_is_current:
            need.pop("old_logprobs", None)
        given = dict(
            rewards=rewards,
            group_ids=group_ids,
            is_demo=is_demo,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
        )
        self._missing(given, need)
        with torch.no_grad():
            return self._prepare(
                response_mask,
                rewards,
                group_ids,
                is_demo,
                old_logprobs,
                ref_logprobs,
                values,
                rollout_logprobs,
                step,
                old_is_current,
            )

    def _prepare(
        self,
        response_mask: Tensor,
        rewards: Tensor | None,
        group_ids: Tensor | None,
        is_demo: Tensor | None,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        values: Tensor | None,
        rollout_logprobs: Tensor | None,
        step: int,
        old_is_current: bool,
    ) -> Prepared:
        if response_mask.dim() != 2:
            raise ValueError(f"response_mask must have shape (B, T); got {tuple(response_mask.shape)}")
        B, T = response_mask.shape
        device = response_mask.device
        _shape("rewards", rewards, (B,))
        _shape("group_ids", group_ids, (B,))
        _shape("is_demo", is_demo, (B,))
        for name, x in (
            ("old_logprobs", old_logprobs),
            ("ref_logprobs", ref_logprobs),
            ("values", values),
            ("rollout_logprobs", rollout_logprobs),
        ):
            _shape(name, x, (B, T))
        floats = [
            x
            for x in (old_logprobs, ref_logprobs, values, rollout_logprobs, rewards)
            if x is not None and x.is_floating_point()
        ]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in floats) else torch.float32
        mask = response_mask.to(device=device) != 0
        mf = mask.to(dtype)
        no_demo = torch.zeros(B, dtype=torch.bool, device=device)
        demo = no_demo if is_demo is None else is_demo.to(device).bool()
        rollout = ~demo
        if group_ids is None:
            group, n_groups = torch.arange(B, device=device), B
        else:
            uniq, group = torch.unique(group_ids.to(device), return_inverse=True)
            n_groups = int(uniq.numel())
        R = (
            rewards.to(device=device, dtype=dtype)
            if rewards is not None
            else torch.zeros(B, dtype=dtype, device=device)
        )
        old = _clean(old_logprobs, mask, dtype)
        ref = _clean(ref_logprobs, mask, dtype)
        vals = _clean(values, mask, dtype)
        stats = question_stats(R, group, n_groups, rollout, step)
        rows_per_q = torch.zeros(n_groups, dtype=dtype, device=device).index_add(0, group, torch.ones_like(R))
        question_share = 1.0 / (rows_per_q[group] * max(n_groups, 1))  # sums to 1 over all rows

        tis_w, tis_live = None, None
        cap = self.settings.rollout.tis_cap
        if cap is not None and rollout_logprobs is not None:
            rlp = _clean(rollout_logprobs, mask, dtype)
            rmask = mask & rollout[:, None]
            if old is not None and not old_is_current:
                tis_w = self._tis(old, rlp, rmask, cap)
            else:
                tis_live = (rlp, rmask, float(cap))

        coef, advs, toks, live, row_metrics, weights = [], [], [], [], {}, {}
        n_tok: list[float] = []
        returns = None
        critic_rows = torch.zeros(B, dtype=torch.bool, device=device)
        for term in self.terms:
            spec = term.spec
            wq = term.weight(stats).to(dtype)
            bad = ~torch.isfinite(wq)
            wq = torch.where(bad, 0.0, wq)
            weights[term.name] = wq
            w = wq[group]
            selected = _rows(spec.on, demo)
            active = selected & (w != 0)
            pooled = _rows(spec.group, demo)
            inp = AdvInputs(R, group, n_groups, pooled, active, mask, vals)
            a_hat = term.adv(inp, *spec.adv.args).to(dtype)
            if spec.adv.name == "gae" and returns is None:
                returns = gae_returns(R, vals, mask, *spec.adv.args)[1]  # type: ignore[arg-type]
            if spec.adv.name == "gae":
                critic_rows |= selected
            a_hat = a_hat if a_hat.dim() == 2 else a_hat[:, None]
            m_active = mf * active[:, None].to(dtype)
            c = w[:, None] * term.agg(m_active, *spec.agg.args)
            if tis_w is not None:
                c = c * tis_w
            count = m_active.sum()
            tok = m_active / count.clamp(min=1)
            coef.append(c)
            advs.append(a_hat)
            toks.append(tok)
            n_tok.append(float(count))
            live.append(bool((c != 0).any()))
            row_metrics[f"adv_mean/{term.name}"] = (tok * a_hat).sum(dim=1)
            row_metrics[f"gate/{term.name}"] = question_share * (wq != 0)[group].to(dtype)
            if bool(bad.any()):
                row_metrics[f"gate/{term.name}/nonfinite"] = question_share * bad[group].to(dtype)
        for br in self.branches:
            taken = br.taken(stats) != 0
            row_metrics[f"branch/{br.label}"] = question_share * taken[group].to(dtype)
        if tis_w is not None:
            rmask = mask & rollout[:, None]
            share = rmask.to(dtype) / rmask.sum().clamp(min=1)
            log_w = torch.where(rmask, old - rlp, 0.0)  # type: ignore[operator]
            row_metrics["tis/trunc_frac"] = (share * (log_w.exp() > cap)).sum(dim=1)
            row_metrics["tis/mismatch"] = (share * log_w.abs()).sum(dim=1)

        value_coef, old_values = None, None
        if returns is not None:
            critic = self.settings.critic or CriticSettings()
            mc = mf * critic_rows[:, None].to(dtype)
            value_coef = critic.coef * mc / mc.sum().clamp(min=1)
            old_values = vals

        shares = self._shares(n_tok)
        if "adv_mean" in shares:
            parts = [
                s * row_metrics[f"adv_mean/{t.name}"]
                for s, t in zip(shares["adv_mean"], self.terms, strict=True)
            ]
            row_metrics["adv_mean"] = torch.stack(parts).sum(dim=0)
        return Prepared(
            response_mask=mask,
            coef=coef,
            adv=advs,
            tok=toks,
            live=live,
            shares=shares,
            row_metrics=row_metrics,
            old_logprobs=old,
            ref_logprobs=ref,
            old_is_current=old_is_current,
            returns=returns,
            old_values=old_values,
            value_coef=value_coef,
            tis=tis_live,
            stats=stats,
            weights=weights,
        )

    @staticmethod
    def _tis(old: Tensor, rollout_lp: Tensor, rmask: Tensor, cap: float) -> Tensor:
        """sg(min(pi_old / pi_rollout, C)) on rollout tokens, 1 elsewhere."""
        return torch.where(rmask, torch.exp(old - rollout_lp).clamp(max=cap), 1.0)

    def _shares(self, n_tok: list[float]) -> dict[str, list[float]]:
        """For each overall metric, the weight of each term's per-term value: its share of the
        active tokens among the terms that define the metric (0 for the others)."""
        defines = {
            "clip_frac": [t.spec.mask.name != "none" for t in self.terms],
            "ratio_mean": [t.spec.denom != "pi_theta" for t in self.terms],
            "kl": [t.spec.kl is not None for t in self.terms],
            "entropy": [True for _ in self.terms],
            "adv_mean": [True for _ in self.terms],
        }
        out: dict[str, list[float]] = {}
        for name, flags in defines.items():
            total = sum(n for n, f in zip(n_tok, flags, strict=True) if f)
            if any(flags):
                out[name] = [
                    (n / total if total else 0.0) if f else 0.0 for n, f in zip(n_tok, flags, strict=True)
                ]
        return out

    # ----- one micro-batch ---------------------------------------------------------------

    def loss(
        self,
        prep: Prepared,
        *,
        logprobs: Tensor,
        rows: Rows = None,
        entropy: Tensor | None = None,
        values: Tensor | None = None,
    ) -> LossOutput:
        """The loss of the rows ``rows`` of the prepared mini-batch (all rows when None).

        logprobs: (b, T) log pi_theta of the taken tokens of these rows, with gradient;
        entropy: (b, T) per-token entropy (needed when a term has an entropy bonus; reported
        as a metric whenever passed); values: (b, T) new critic values, with gradient (adv=gae).
        """
        idx = slice(None) if rows is None else rows
        mask = prep.response_mask[idx]
        width = logprobs.shape[-1]
        if logprobs.dim() != 2 or logprobs.shape[0] != mask.shape[0] or width > mask.shape[1]:
            raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}; the rows need {tuple(mask.shape)}")
        if width < mask.shape[1]:
            if bool(mask[:, width:].any()):
                raise ValueError(f"logprobs has {width} columns; these rows have response tokens beyond them")
            mask = mask[:, :width]
        if entropy is None and any(t.spec.entropy for t in self.terms):
            raise ValueError("this estimator has an entropy bonus: pass `entropy` (per-token entropy (b, T))")
        lp = logprobs
        dt = lp.dtype

        def take(x: Tensor) -> Tensor:
            """rows ``idx`` of a prepared tensor, trimmed to the micro-batch's columns, in lp's dtype."""
            x = x[idx]
            return (x[:, :width] if x.dim() == 2 else x).to(dt)

        old = None if prep.old_logprobs is None else take(prep.old_logprobs)
        if old is None and prep.old_is_current:
            old = lp.detach()
        ref = None if prep.ref_logprobs is None else take(prep.ref_logprobs)
        tis = None
        if prep.tis is not None:
            rlp, rmask, cap = prep.tis
            rm = rmask[idx][:, :width]
            base = old if old is not None else lp.detach()
            log_w = torch.where(rm, base - take(rlp), 0.0)
            tis = torch.where(rm, log_w.exp().clamp(max=cap), 1.0)
        metrics: dict[str, Tensor] = {}
        zero = lp[:, :0].sum()  # 0 with a (zero) gradient path, whatever lp holds
        total = zero
        per_term: dict[str, dict[str, Tensor]] = {}
        for k, term in enumerate(self.terms):
            if not prep.live[k]:
                metrics[f"loss/{term.name}"] = zero.detach()
                continue
            c = take(prep.coef[k])
            if tis is not None:
                c = c * tis
            t = TokenInputs(lp, old, mask, take(prep.adv[k]))
            tok_loss, clipped, rho, kl = term.token_loss(t, ref, entropy)
            contrib = (c * tok_loss).sum()
            total = total + contrib
            metrics[f"loss/{term.name}"] = contrib.detach()
            u = take(prep.tok[k])
            mine: dict[str, Tensor] = {}
            with torch.no_grad():
                if clipped is not None:
                    mine["clip_frac"] = (u * clipped).sum()
                if term.spec.denom != "pi_theta":
                    mine["ratio_mean"] = (u * rho).sum()
                if kl is not None:
                    mine["kl"] = (u * kl).sum()
                if entropy is not None:
                    mine["entropy"] = (u * entropy.detach()).sum()
            per_term[term.name] = mine
            for key, v in mine.items():
                metrics[f"{key}/{term.name}"] = v
        for key, shares in prep.shares.items():
            parts = [
                s * per_term[t.name][key]
                for s, t in zip(shares, self.terms, strict=True)
                if s and key in per_term.get(t.name, {})
            ]
            if parts:
                metrics[key] = torch.stack(parts).sum()
        for key, share in prep.row_metrics.items():
            metrics[key] = share[idx].sum()
        if prep.tis is not None:
            n = prep.tis[1].sum().clamp(min=1)
            metrics["tis/trunc_frac"] = (rm & (log_w.exp() > cap)).sum() / n
            metrics["tis/mismatch"] = log_w.detach().abs().sum() / n
        value_loss = None
        if values is not None and prep.returns is not None:
            value_loss = self._value_loss(prep, take, values)
            metrics["value_loss"] = value_loss.detach()
        metrics["loss"] = total.detach()
        return LossOutput(loss=total, metrics=metrics, value_loss=value_loss)

    def _value_loss(self, prep: Prepared, take: Callable[[Tensor], Tensor], values: Tensor) -> Tensor:
        """coef * sum_t a_t * 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2)  (PPO),
        G the GAE returns, a the token-mean weights over the critic's tokens."""
        critic = self.settings.critic or CriticSettings()
        ret = take(prep.returns).to(values.dtype)  # type: ignore[arg-type]
        v_old = take(prep.old_values).to(values.dtype)  # type: ignore[arg-type]
        eps = critic.value_clip
        v_clip = v_old + (values - v_old).clamp(-eps, eps)
        vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
        return (take(prep.value_coef).to(values.dtype) * vf).sum()  # type: ignore[arg-type]

    # ----- one shot ----------------------------------------------------------------------

    def __call__(
        self,
        *,
        logprobs: Tensor,
        response_mask: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        rewards: Tensor | None = None,
        group_ids: Tensor | None = None,
        is_demo: Tensor | None = None,
        values: Tensor | None = None,
        entropy: Tensor | None = None,
        rollout_logprobs: Tensor | None = None,
        step: int = 0,
    ) -> LossOutput:
        """prepare + loss over the whole batch in one call (``values`` serve as the old values too)."""
        prep = self.prepare(
            response_mask=response_mask,
            rewards=rewards,
            group_ids=group_ids,
            is_demo=is_demo,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            values=None if values is None else values.detach(),
            rollout_logprobs=rollout_logprobs,
            step=step,
        )
        return self.loss(prep, logprobs=logprobs, entropy=entropy, values=values)


# ----- helpers ---------------------------------------------------------------------------------


def _rows(which: str, demo: Tensor) -> Tensor:
    if which == "rollouts":
        return ~demo
    if which == "demos":
        return demo.clone()
    return torch.ones_like(demo)


def _shape(name: str, x: Tensor | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != shape:
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}; expected {shape} to match response_mask")


def _clean(x: Tensor | None, mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """x on response tokens, 0 elsewhere (padding may hold anything, even inf or NaN)."""
    if x is None:
        return None
    return torch.where(mask, x.to(device=mask.device, dtype=dtype), 0.0)


def _take(x: Tensor | None, idx: slice | Tensor, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x[idx].to(dtype)


def _stats_used(loss: LossExpr) -> set[str]:
    """Names of the statistics a loss tree reads."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, Stat):
            found.add(node.name)
            return
        if isinstance(node, (Term, str, int, float)) or node is None:
            return
        if isinstance(node, (tuple, list)):
            for item in node:
                walk(item)
            return
        if hasattr(node, "__dataclass_fields__"):
            for f in node.__dataclass_fields__:
                walk(getattr(node, f))

    walk(loss)
    return found


def _check_spec(spec: EstimatorSpec, name: str) -> None:
    if spec.grad.name == "shaped" and spec.denom == "pi_theta":
        raise ValueError(
            f"estimator {name}: grad=shaped applies to a ratio or pi_theta; use denom=pi_old, "
            f"pi_old_seq or 1 (with denom=pi_theta there is nothing to shape)"
        )
    if spec.grad.name == "shaped" and spec.mask.name == "cispo":
        raise ValueError(f"estimator {name}: mask=cispo sets its own likelihood term; use grad=loglik")


def derive_needs(specs: list[EstimatorSpec]) -> Needs:
    """What a list of estimators needs at run time (used when there is no checked recipe)."""
    return Needs(
        rollouts=any(s.on != "demos" or s.group != "rollouts" for s in specs),
        demos=any(s.on != "rollouts" or s.group != "rollouts" for s in specs),
        old_logprobs=any(s.denom in ("pi_old", "pi_old_seq") or s.mask.name == "seq_clip" for s in specs),
        ref_model=any(s.kl is not None for s in specs),
        critic=any(s.adv.name == "gae" for s in specs),
        entropy=any(bool(s.entropy) for s in specs),
    )


def compile_loss(loss: LossExpr, settings: Settings | None = None, needs: Needs | None = None) -> LossProgram:
    """Compile a loss tree (terms, scales, sums, gates) into a LossProgram."""
    settings = settings or Settings()
    pairs, branches = flatten(loss)
    terms: list[CompiledTerm] = []
    seen: set[str] = set()
    for k, (spec, weight) in enumerate(merged(pairs)):
        name = spec.name or f"term{k}"
        while name in seen:
            name = f"{name}#{k}"
        seen.add(name)
        _check_spec(spec, name)
        terms.append(
            CompiledTerm(
                name=name,
                spec=spec,
                weight=weight,
                denom=lookup("denom", spec.denom),
                mask=lookup("mask", spec.mask.name),
                shape=lookup("grad", spec.grad.name)(*spec.grad.args),
                adv=lookup("adv", spec.adv.name),
                agg=lookup("agg", spec.agg.name),
                kl=lookup("kl", spec.kl.name) if spec.kl is not None else None,
            )
        )
    if needs is None:
        needs = derive_needs([t.spec for t in terms])
    return LossProgram(terms, branches, settings, needs, _stats_used(loss))


def compile_recipe(recipe: Recipe) -> LossProgram:
    """Compile a checked recipe."""
    return compile_loss(recipe.loss, recipe.settings, recipe.needs)


def compile_spec(spec: EstimatorSpec, settings: Settings | None = None) -> LossProgram:
    """Compile a single estimator (weight 1 on every question)."""
    return compile_loss(Term(spec), settings)


__all__ = [
    "CompiledTerm",
    "LossOutput",
    "LossProgram",
    "Prepared",
    "compile_loss",
    "compile_recipe",
    "compile_spec",
    "derive_needs",
]
