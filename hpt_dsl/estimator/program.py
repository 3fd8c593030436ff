"""LossProgram: ``prepare`` once per optimizer mini-batch, ``loss`` once per micro-batch.

``prepare`` is the global pass over the whole mini-batch (no gradient): per-question
statistics, each term's gate weight w_i per row, its advantages, and its per-row token
weight  c_i = w_i * [row i active] * a_i  (a_i from the aggregation, with every count taken
over the whole mini-batch). ``loss`` is then, for the rows of one micro-batch,

    loss = -sum_k sum_{i in rows} c^k_i * sum_t m_{i,t} * tis_{i,t} * J^k_{i,t}
    J^k  = mask(denom, adv, grad) - kl_coef * kl + entropy_coef * H      (the token objective)

which is additive over micro-batches by construction: summing ``loss`` over any split of
the rows gives the full-batch loss and gradient. Every metric is built the same way (a
per-row share prepared globally, summed over the rows at hand), so metrics add up too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.estimator import regularize
from hpt_dsl.estimator.adv import AdvInputs, gae_returns, gae_whitens, whiten_tokens
from hpt_dsl.estimator.denom import TokenInputs
from hpt_dsl.estimator.gate import Branch, Scope, WeightFn
from hpt_dsl.estimator.plugins import declared_needs
from hpt_dsl.estimator.registry import lookup
from hpt_dsl.estimator.stats import question_stats
from hpt_dsl.recipe import GROUP_ADVANTAGES, EstimatorSpec, Needs, estimator_needs
from hpt_dsl.settings import CriticSettings, Settings

GROUP_ADVS = GROUP_ADVANTAGES


@dataclass(frozen=True)
class CompiledTerm:
    """One estimator with its components looked up in the registry, and its gate weight."""

    name: str
    spec: EstimatorSpec
    weight: WeightFn
    scope: Scope
    denom: Callable[..., Any]
    mask: Callable[..., Any]
    shape: Callable[[Tensor], Tensor]
    adv: Callable[..., Any]
    agg: Callable[..., Any]
    kl: Callable[[Tensor], Tensor] | None

    def objective(
        self, t: TokenInputs, ref: Tensor | None, entropy: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(J, clipped tokens, rho, kl) for one micro-batch: J is the per-token objective
        (the token loss is -J), mask(denom, adv, grad) - kl_coef * kl + entropy_coef * H."""
        if getattr(self.mask, "uses_x", True):
            lik = self.denom(t)
        else:
            with torch.no_grad():
                lik = self.denom(t)
        obj, clipped = self.mask(t, lik, self.shape, *self.spec.mask.args)
        if self.spec.ent_weight is not None:
            if entropy is None:
                raise ValueError("ent_weight needs `entropy` (per-token entropy (b, T))")
            obj = obj * regularize.entropy_weight(self.spec.ent_weight, entropy, t.mf, t.length, t.adv)
        kl = None
        if self.kl is not None and self.spec.kl is not None and ref is not None:
            kl = self.kl(regularize.log_ratio(t.lp, ref, t.mask))
            obj = obj - self.spec.kl.args[0] * kl
        if self.spec.entropy and entropy is not None:
            obj = obj + self.spec.entropy * entropy
        return obj, clipped, lik.rho, kl


@dataclass
class Prepared:
    """The global pass over one optimizer mini-batch (see LossProgram.prepare).

    Per term k: coef[k] (B,) c_i, the weight of each token of row i (gate weight times
    aggregation weight); adv[k] (B, 1) or (B, T); tok[k] (B,) [row active] / N_tok, the
    token-mean weights of metrics; live[k] False when the term has no token at all.
    row_metrics: name -> (B,) per-row shares of batch-level metrics; shares: how the
    overall metrics mix the per-term ones. tis: (B, T) truncated IS weights, or the
    (rollout_logprobs, rollout tokens, cap, number of rollout tokens) to weigh with when
    pi_old is the live policy.
    value_coef: (B,) per-row weight of the critic's token losses.
    silent_metrics: name -> (B,) the metric shares of the rows that were made silent (see
    ``LossProgram._silence``): a learner adds them whether or not it forwards those rows.
    moments: term name -> (2,) [mu, d], the whitening moments its advantage used
    (A = (x - mu) / d), for the terms whose advantage is standardised over the step.
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
    tis: Tensor | tuple[Tensor, Tensor, float, float] | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    silent_metrics: dict[str, Tensor] = field(default_factory=dict)
    moments: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    PER_ROW = ("response_mask", "coef", "adv", "tok", "row_metrics", "old_logprobs", "ref_logprobs", "returns",
               "old_values", "value_coef", "tis", "silent_metrics")  # fmt: skip
    """Fields with one entry per row: a process keeps its own rows of them."""
    WHOLE_BATCH = ("live", "shares", "old_is_current", "stats", "weights", "moments")
    """Fields about the whole mini-batch (its questions, its terms): every process keeps them whole."""

    def local(self, rows: slice, width: int) -> Prepared:
        """This mini-batch restricted to ``rows`` and to the first ``width`` response columns
        (a process's share, see ``hpt_dsl.dist``). Per-question statistics and gate weights
        stay global: they are about questions, and every process reports the same values."""
        unknown = {f.name for f in fields(self)} - set(self.PER_ROW) - set(self.WHOLE_BATCH)
        if unknown:
            raise NotImplementedError(f"Prepared.local does not know the fields {sorted(unknown)}")

        def cut(x: Any) -> Any:
            if isinstance(x, Tensor):
                x = x[rows]
                return x[:, :width] if x.dim() == 2 and x.shape[1] > 1 else x
            if isinstance(x, list):
                return [cut(v) for v in x]
            if isinstance(x, tuple):
                return tuple(cut(v) for v in x)
            if isinstance(x, dict):
                return {k: cut(v) for k, v in x.items()}
            return x

        return replace(self, **{name: cut(getattr(self, name)) for name in self.PER_ROW})


@dataclass
class LossOutput:
    """loss: the policy loss of these rows (0-d, with gradient); value_loss: the clipped critic
    loss (adv=gae with ``values`` passed) or None; metrics: 0-d detached tensors, additive over
    micro-batches."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    value_loss: Tensor | None = None


Rows = Tensor | slice | None


@dataclass
class _Batch:
    """A mini-batch as ``prepare`` reads it: the (B, T) response mask and the (B,) lengths
    |y_i|, demonstration flags and rewards, and the (B, T) tensors the terms read (pi_old,
    critic values, pi_ref, the rollout engine's log-probs; None where no term reads them), 0
    off the response, all in one float dtype."""

    mask: Tensor
    length: Tensor
    demo: Tensor
    rewards: Tensor
    old: Tensor | None
    values: Tensor | None
    ref: Tensor | None
    rollout: Tensor | None
    tis_cap: float | None
    dtype: torch.dtype


@dataclass
class _Questions:
    """The questions of a mini-batch: each row's dense question index ``group`` (B,), their
    number Q, their statistics (Q,) and each row's share of "all questions",
    share_i = 1 / (rows of i's question * Q), which sums to 1 over the rows."""

    group: Tensor
    n_groups: int
    stats: dict[str, Tensor]
    share: Tensor


@dataclass
class _Terms:
    """Per term k: its advantages, metric token weights tok_k, active token count N_k,
    active rows and row gate weights w_i; its per-question weights (by name); the whitening
    moments used, the GAE returns and the critic's rows; and the per-row metric shares."""

    critic_rows: Tensor
    adv: list[Tensor] = field(default_factory=list)
    tok: list[Tensor] = field(default_factory=list)
    counts: list[Tensor] = field(default_factory=list)
    active: list[Tensor] = field(default_factory=list)
    w: list[Tensor | float] = field(default_factory=list)
    weights: dict[str, Tensor] = field(default_factory=dict)
    moments: dict[str, Tensor] = field(default_factory=dict)
    returns: Tensor | None = None
    row_metrics: dict[str, Tensor] = field(default_factory=dict)


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
        self.per_question = any(t.scope.per_question for t in terms)
        self.uses_old = any("old_logprobs" in estimator_needs(t.spec, declared_needs()) for t in terms)
        """Some term reads pi_old (its denominator, its mask or a plugin's declared needs)."""
        self.step_whitened = [t.name for t in terms if _step_whitened(t.spec)]
        """Terms whose advantages are standardised over the whole step (see ``prepare``)."""
        self.const_weights: list[float] | None = None
        self.const_branches: list[bool] | None = None
        if not stats_used:  # no weight reads a statistic: evaluate every weight once, here
            one = {"n": torch.zeros(1, dtype=torch.float64, device="cpu")}  # evaluated on the host
            weights = [float(t.weight(one)[0]) for t in terms]
            self.const_weights = [w if math.isfinite(w) else 0.0 for w in weights]
            self.const_branches = [bool(b.taken(one)[0] != 0) for b in branches]

    def __repr__(self) -> str:
        return "LossProgram(" + ", ".join(f"{t.name}: {t.spec.components()}" for t in self.terms) + ")"

    # ----- what must be passed -------------------------------------------------------------

    def required_inputs(self) -> dict[str, str]:
        """name -> description of every input ``prepare`` needs for this program."""
        need: dict[str, str] = {}
        specs = [t.spec for t in self.terms]
        per_question = bool(self.stats_used - {"step"})
        if per_question or any(s.adv.name != "const" for s in specs):
            need["rewards"] = "one scalar reward per row, shape (B,)"
        if per_question or self.per_question or any(s.adv.name in GROUP_ADVS for s in specs):
            need["group_ids"] = "the integer question id of each row, shape (B,)"
        if any(s.on != "rollouts" or s.group != "rollouts" for s in specs):
            need["is_demo"] = "True on demonstration rows, shape (B,)"
        if self.uses_old:
            need["old_logprobs"] = "log pi_old of the taken tokens, shape (B, T)"
        if any(s.kl is not None for s in specs):
            need["ref_logprobs"] = "log pi_ref of the taken tokens (frozen reference model), shape (B, T)"
        if any(s.adv.name == "gae" for s in specs):
            need["values"] = "the critic's values of the response tokens, shape (B, T)"
        return need

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
        step_moments: dict[str, Tensor] | None = None,
    ) -> Prepared:
        """Everything that needs the whole optimizer mini-batch, computed once, without gradient.

        ``old_is_current=True`` says pi_old is the policy being trained (on-policy data, one
        update epoch): each micro-batch's detached ``logprobs`` then serve as pi_old and
        ``old_logprobs`` need not be passed.

        ``step_moments``: the whitening moments of the advantages that are standardised over
        the whole step (``adv=batch_norm``, ``token_whiten``, whitened ``gae``), as the
        ``moments`` of a prepare over the whole step. When a step is split into several
        optimizer mini-batches, pass them to each mini-batch's prepare, so that every
        mini-batch whitens with the step's statistics; None: this batch is the step.
        """
        need = self.required_inputs()
        if old_is_current:
            need.pop("old_logprobs", None)
        given = dict(
            rewards=rewards, group_ids=group_ids, is_demo=is_demo, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, values=values,
        )  # fmt: skip
        missing = [f"  {k}: {v}" for k, v in need.items() if given.get(k) is None]
        if missing:
            raise ValueError("this estimator needs inputs that were not passed:\n" + "\n".join(missing))
        if response_mask.dim() != 2:
            raise ValueError(f"response_mask must have shape (B, T); got {tuple(response_mask.shape)}")
        B, T = response_mask.shape
        for name, x, shape in (
            ("rewards", rewards, (B,)), ("group_ids", group_ids, (B,)), ("is_demo", is_demo, (B,)),
            ("old_logprobs", old_logprobs, (B, T)), ("ref_logprobs", ref_logprobs, (B, T)),
            ("values", values, (B, T)), ("rollout_logprobs", rollout_logprobs, (B, T)),
        ):  # fmt: skip
            if x is not None and tuple(x.shape) != shape:
                raise ValueError(
                    f"`{name}` has shape {tuple(x.shape)}; expected {shape} to match response_mask"
                )
        with torch.no_grad():
            return self._prepare(
                response_mask, rewards, group_ids, is_demo, old_logprobs, ref_logprobs, values,
                rollout_logprobs, step, old_is_current, step_moments,
            )  # fmt: skip

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
        step_moments: dict[str, Tensor] | None,
    ) -> Prepared:
        """``prepare``'s steps, on checked inputs: the batch, its questions, each term's gate
        weight and advantages, the aggregation weights c_i, the branch metrics, the truncated
        IS weights, the critic's weights, the silent rows, then one synchronisation for every
        count and the metric shares."""
        b = self._batch(response_mask, rewards, is_demo, old_logprobs, ref_logprobs, values, rollout_logprobs)
        q = self._questions(b, group_ids, step)
        t = self._terms(b, q, step_moments)
        row_metrics = t.row_metrics
        coef = self._aggregate(t.active, t.w, b.length, q.group, q.n_groups)
        self._branch_metrics(q, row_metrics)
        tis, live_tis = self._tis(b, coef, t.critic_rows, old_is_current, row_metrics)
        value_coef = self._value_coef(b, t)
        silent = self._silence(coef, t.adv, t.tok, b.mask, b.length) if old_is_current and live_tis is None else {}
        n_tok, live, n_tis = self._sync_counts(coef, t.counts, row_metrics, live_tis, b.dtype)
        if live_tis is not None:
            tis = (*live_tis, n_tis)
        shares = self._shares(n_tok)
        self._mix_adv_mean(row_metrics, shares)
        return Prepared(
            response_mask=b.mask, coef=coef, adv=t.adv, tok=t.tok, live=live, shares=shares,
            row_metrics=row_metrics,
            old_logprobs=b.old, ref_logprobs=b.ref, old_is_current=old_is_current,
            returns=t.returns, old_values=b.values if t.returns is not None else None, value_coef=value_coef,
            tis=tis, stats=q.stats, weights=t.weights, silent_metrics=self._mix_silent(silent, shares),
            moments=t.moments,
        )  # fmt: skip

    def _batch(
        self,
        response_mask: Tensor,
        rewards: Tensor | None,
        is_demo: Tensor | None,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        values: Tensor | None,
        rollout_logprobs: Tensor | None,
    ) -> _Batch:
        """The inputs in one float dtype (float64 when any is) on the mask's device: lengths
        |y_i| = sum_t m_{i,t}, rewards (0 when not given), demonstration flags, and only the
        (B, T) tensors some term reads, each 0 off the response (``_clean``)."""
        B = response_mask.shape[0]
        device = response_mask.device
        floats = [x for x in (old_logprobs, ref_logprobs, values, rollout_logprobs, rewards) if x is not None]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in floats) else torch.float32
        mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
        demo = (
            torch.zeros(B, dtype=torch.bool, device=device) if is_demo is None else is_demo.to(device).bool()
        )
        R = torch.zeros(B, dtype=dtype, device=device) if rewards is None else rewards.to(device, dtype)
        specs = [t.spec for t in self.terms]
        tis_cap = self.settings.rollout.tis_cap if rollout_logprobs is not None else None
        old, vals, ref, rlp = _clean(
            [
                old_logprobs if self.uses_old or tis_cap is not None else None,
                values if any(s.adv.name == "gae" for s in specs) else None,
                ref_logprobs if any(s.kl is not None for s in specs) else None,
                rollout_logprobs if tis_cap is not None else None,
            ],
            mask,
            dtype,
        )
        return _Batch(mask, mask.sum(dim=1, dtype=dtype), demo, R, old, vals, ref, rlp, tis_cap, dtype)

    def _questions(self, b: _Batch, group_ids: Tensor | None, step: int) -> _Questions:
        """A dense question index per row (each row its own question when no term needs
        groups), the per-question statistics the gate reads (none when every weight is
        constant) and each row's share of "all questions"."""
        B, device, dtype = b.mask.shape[0], b.mask.device, b.dtype
        gated = self.const_weights is None
        per_question = any(t.scope.per_question for t in self.terms)
        group_advs = any(t.spec.adv.name in GROUP_ADVS for t in self.terms)
        if group_ids is not None and (gated or per_question or group_advs):
            uniq, group = torch.unique(group_ids.to(device), return_inverse=True)
            n_groups = int(uniq.numel())
        else:
            group, n_groups = torch.arange(B, device=device), B
        if not gated:  # every question has the same weights: no statistics needed
            return _Questions(group, n_groups, {}, torch.full((B,), 1.0 / max(B, 1), dtype=dtype, device=device))
        stats = question_stats(b.rewards, group, n_groups, ~b.demo, step)
        for name in self.stats_used - set(stats):  # a plugin's statistic
            stats[name] = lookup("stat", name)(b.rewards, group, n_groups, ~b.demo).to(device=device, dtype=dtype)
        rows_per_q = torch.zeros(n_groups, dtype=dtype, device=device).index_add(
            0, group, torch.ones_like(b.rewards)
        )
        share = 1.0 / (rows_per_q[group] * max(n_groups, 1))  # sums to 1 over all rows
        return _Questions(group, n_groups, stats, share)

    def _terms(self, b: _Batch, q: _Questions, step_moments: dict[str, Tensor] | None) -> _Terms:
        """Each term's gate weight and advantages, and its metric token weights
        tok_i = [row i active] / N_tok (N_tok its active tokens) with adv_mean's row shares."""
        out = _Terms(torch.zeros(b.mask.shape[0], dtype=torch.bool, device=b.mask.device))
        for k, term in enumerate(self.terms):
            wq, w, active = self._gate(k, term, b, q, out.row_metrics)
            out.weights[term.name] = wq
            given = None if step_moments is None else step_moments.get(term.name)
            a_hat = self._advantage(term, b, q, active, given, out)
            L = b.length * active
            out.active.append(active)
            out.w.append(w)
            tok = active.to(b.dtype) / L.sum().clamp(min=1)
            out.tok.append(tok)
            out.counts.append(L.sum())
            if a_hat.dim() == 2:
                out.row_metrics[f"adv_mean/{term.name}"] = tok * (a_hat * b.mask).sum(dim=1)
            else:
                out.row_metrics[f"adv_mean/{term.name}"] = tok * a_hat * b.length
                a_hat = a_hat[:, None]
            out.adv.append(a_hat)
        return out

    def _gate(
        self, k: int, term: CompiledTerm, b: _Batch, q: _Questions, row_metrics: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | float, Tensor]:
        """(per-question weights (Q,), row weights w_i, active rows) of term k: w_i is the
        weight of row i's question (a weight that is not finite, 1 / acc at acc = 0, becomes 0
        and is counted), and a row is active when the term's ``on=`` selects it and w_i != 0.
        Records the share of questions each term weighs (``gate/<term>``)."""
        selected = _rows(term.spec.on, b.demo)
        if self.const_weights is not None:
            w = self.const_weights[k]
            wq = torch.tensor(w, dtype=b.dtype, device=b.mask.device)
            active = selected if w != 0 else torch.zeros_like(selected)
            row_metrics[f"gate/{term.name}"] = q.share if w != 0 else torch.zeros_like(q.share)
            return wq, w, active
        wq = term.weight(q.stats).to(b.dtype)
        bad = ~torch.isfinite(wq)  # a weight read from statistics may be inf or NaN (1 / acc): it becomes 0
        wq = torch.where(bad, 0.0, wq)
        row_metrics[f"gate/{term.name}/nonfinite"] = q.share * bad[q.group]
        row_w = wq[q.group]
        active = selected & (row_w != 0)
        row_metrics[f"gate/{term.name}"] = q.share * (wq != 0)[q.group]
        return wq, row_w, active

    def _advantage(
        self, term: CompiledTerm, b: _Batch, q: _Questions, active: Tensor, given: Tensor | None, out: _Terms
    ) -> Tensor:
        """The term's advantages A_hat, (B,) or (B, T). GAE also gives the critic's returns
        and rows; a whitened advantage uses the step's moments ``given`` (or its own) and
        records them in ``out.moments``."""
        spec = term.spec
        if spec.adv.name == "gae":  # its returns train the critic: one pass gives both
            a_hat, ret = gae_returns(b.rewards, b.values, b.mask, *spec.adv.args[:2])  # type: ignore[arg-type]
            out.returns = ret if out.returns is None else out.returns
            out.critic_rows = out.critic_rows | _rows(spec.on, b.demo)
            if gae_whitens(spec.adv.args):
                a_hat, out.moments[term.name] = whiten_tokens(a_hat, b.mask & active[:, None], given)
            return a_hat
        inp = AdvInputs(b.rewards, q.group, q.n_groups, _rows(spec.group, b.demo), active, b.mask, b.values, given)
        a_hat = term.adv(inp, *spec.adv.args).to(b.dtype)
        if hasattr(term.adv, "moments"):
            out.moments[term.name] = given if given is not None else term.adv.moments(inp, *spec.adv.args)
        return a_hat

    def _branch_metrics(self, q: _Questions, row_metrics: dict[str, Tensor]) -> None:
        """The share of questions that take each gate branch (``branch/<condition>``)."""
        for j, br in enumerate(self.branches):
            if self.const_branches is None:
                row_metrics[f"branch/{br.label}"] = q.share * (br.taken(q.stats) != 0)[q.group]
            else:
                row_metrics[f"branch/{br.label}"] = q.share if self.const_branches[j] else torch.zeros_like(q.share)

    def _tis(
        self, b: _Batch, coef: list[Tensor], critic_rows: Tensor, old_is_current: bool,
        row_metrics: dict[str, Tensor],
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor, float] | None]:  # fmt: skip
        """Truncated IS over the rollout tokens the loss uses, min(pi_old / pi_rollout, C):
        (the weights, None) when pi_old is given, with the truncation and mismatch shares;
        (None, (rollout log-probs, token mask, C)) when pi_old is the live policy, so that
        ``loss`` weighs with the micro-batch's own log-probs; (None, None) without it."""
        cap = b.tis_cap
        if cap is None:
            return None, None
        # the rollout tokens the loss uses: an unused row's pi_old is never computed
        used = torch.stack([c != 0 for c in coef]).any(dim=0) if coef else torch.zeros_like(b.demo)
        rmask = b.mask & ~b.demo[:, None] & (used | critic_rows)[:, None]
        if b.old is None or old_is_current:  # the weights need the live log-probs: kept for the loss
            return None, (b.rollout, rmask, float(cap))  # type: ignore[return-value]
        tok_share = rmask / rmask.sum().clamp(min=1)
        log_w = torch.where(rmask, b.old - b.rollout, 0.0)  # type: ignore[operator]
        row_metrics["tis/trunc_frac"] = (tok_share * (log_w.exp() > cap)).sum(dim=1)
        row_metrics["tis/mismatch"] = (tok_share * log_w.abs()).sum(dim=1)
        return torch.where(rmask, log_w.exp().clamp(max=cap), 1.0), None

    def _value_coef(self, b: _Batch, t: _Terms) -> Tensor | None:
        """The critic's per-row weight coef * [critic row] / N_critic (a token mean over the
        critic's tokens), or None without a GAE term."""
        if t.returns is None:
            return None
        critic = self.settings.critic or CriticSettings()
        n_critic = (b.length * t.critic_rows).sum().clamp(min=1)
        return critic.coef * t.critic_rows.to(b.dtype) / n_critic

    @staticmethod
    def _sync_counts(
        coef: list[Tensor], counts: list[Tensor], row_metrics: dict[str, Tensor],
        live_tis: tuple[Tensor, Tensor, float] | None, dtype: torch.dtype,
    ) -> tuple[list[float], list[bool], float]:  # fmt: skip
        """One host synchronisation for every count the metrics mix: each term's active token
        count and liveness (a row with weight), whether a question's weight was not finite
        (the ``.../nonfinite`` metrics are dropped where none was), and the rollout tokens of
        live truncated IS (at least 1)."""
        nonfinite = [k for k in row_metrics if k.endswith("/nonfinite")]
        flags = [(c != 0).any().to(dtype) for c in coef] + [row_metrics[k].sum() for k in nonfinite]
        tis_count = [] if live_tis is None else [live_tis[1].sum().to(dtype)]
        summary = torch.stack(counts + flags + tis_count).tolist() if coef or tis_count else []
        n_tis = max(summary.pop(), 1.0) if live_tis is not None else 0.0
        n_tok, live = summary[: len(coef)], [bool(x) for x in summary[len(coef) : 2 * len(coef)]]
        for key, total in zip(nonfinite, summary[2 * len(coef) :], strict=True):
            if not total:  # reported only when some question's weight was not finite
                del row_metrics[key]
        return n_tok, live, n_tis

    def _mix_adv_mean(self, row_metrics: dict[str, Tensor], shares: dict[str, list[float]]) -> None:
        """The overall ``adv_mean``: the terms' ones mixed by their shares of active tokens."""
        if len(self.terms) == 1:
            row_metrics["adv_mean"] = row_metrics[f"adv_mean/{self.terms[0].name}"]
        elif self.terms:
            parts = [
                s * row_metrics[f"adv_mean/{t.name}"]
                for s, t in zip(shares["adv_mean"], self.terms, strict=True)
            ]
            row_metrics["adv_mean"] = torch.stack(parts).sum(dim=0)

    def _aggregate(
        self, actives: list[Tensor], ws: list[Tensor | float], length: Tensor, group: Tensor, n_groups: int
    ) -> list[Tensor]:
        """Each term's per-row token weight c_i = w_i * a_i (agg.py), with the counts N_tok and
        N_seq of row i's scope S(i): the term's own active rows of the mini-batch, or the union
        of the active rows of its ``joint`` group; per question (and a_i / Q) under
        ``per_question``, Q the number of questions in the mini-batch."""
        union: dict[int, Tensor] = {}
        for term, active in zip(self.terms, actives, strict=True):
            j = term.scope.joint
            if j is not None:
                union[j] = active if j not in union else union[j] | active
        coef = []
        for term, active, w in zip(self.terms, actives, ws, strict=True):
            L = length * active
            scoped = length * (active if term.scope.joint is None else union[term.scope.joint])
            if term.scope.per_question:
                zeros = torch.zeros(n_groups, dtype=length.dtype, device=length.device)
                n_tok = zeros.index_add(0, group, scoped)[group]
                n_seq = zeros.index_add(0, group, (scoped > 0).to(length.dtype))[group]
            else:
                n_tok, n_seq = scoped.sum(), (scoped > 0).sum().to(length.dtype)
            a = term.agg(L, n_tok, n_seq, *term.spec.agg.args) * (L > 0)
            if term.scope.per_question:
                a = a / max(n_groups, 1)
            coef.append(a if isinstance(w, float) and w == 1.0 else w * a)
        return coef

    def _silence(
        self, coef: list[Tensor], advs: list[Tensor], toks: list[Tensor], mask: Tensor, length: Tensor
    ) -> dict[str, Tensor]:
        """Rows that cannot move the policy get weight 0 (in place in ``coef`` and ``toks``),
        so that a learner need not forward them; returns their per-term metric shares.

        Every built-in mask makes J a multiple of A (J = A f(x), min(A f(x), A f(clip(rho))),
        sg(min(rho, 1 + eps)) A log pi, ...), so a row whose every token has A = 0 (a GRPO
        group whose rollouts all scored the same) has J = 0 and a zero gradient. With no KL
        and no entropy bonus in the term, the row's loss is exactly 0 whether forwarded or
        not. On-policy (pi_old is the live policy: rho = 1 on every token) its metrics are
        known without a forward pass: no clipped token, a ratio of 1. They are returned, and
        the row's token weight in the term's metrics becomes 0, so that the metrics are the
        same whether the row is forwarded or not.
        """
        out: dict[str, Tensor] = {}
        if any(t.spec.entropy or t.spec.ent_weight is not None for t in self.terms):  # entropy needs every row
            return out
        for k, term in enumerate(self.terms):
            spec = term.spec
            if spec.kl is not None or spec.adv.name == "gae" or not _builtin(term.mask):
                continue
            a = advs[k]
            zero = (a[:, 0] == 0) if a.shape[1] == 1 else ((a == 0) | ~mask).all(dim=1)
            zero &= coef[k] != 0
            coef[k] = torch.where(zero, 0.0, coef[k])
            share = torch.where(zero, toks[k], 0.0)
            toks[k] = toks[k] - share
            if spec.mask.name != "none":
                out[f"clip_frac/{term.name}"] = torch.zeros_like(share)
            if spec.denom != "pi_theta":
                out[f"ratio_mean/{term.name}"] = share * length
        return out

    def _mix_silent(self, silent: dict[str, Tensor], shares: dict[str, list[float]]) -> dict[str, Tensor]:
        """The silent rows' per-term metrics and their mix into the overall ones (as ``loss``
        mixes the forwarded rows' with ``shares``)."""
        out = dict(silent)
        for key in ("clip_frac", "ratio_mean"):
            parts = [s * silent[f"{key}/{t.name}"] for s, t in zip(shares.get(key, []), self.terms, strict=False)
                     if f"{key}/{t.name}" in silent]  # fmt: skip
            if parts:
                out[key] = torch.stack(parts).sum(dim=0)
        return out

    def _shares(self, n_tok: list[float]) -> dict[str, list[float]]:
        """For each overall metric, the weight of each term's value: its share of the active
        tokens among the terms that define the metric (0 for the others)."""
        defines = {
            "clip_frac": [t.spec.mask.name != "none" for t in self.terms],
            "ratio_mean": [t.spec.denom != "pi_theta" for t in self.terms],
            "kl": [t.spec.kl is not None for t in self.terms],
            "entropy": [True for _ in self.terms],
            "adv_mean": [True for _ in self.terms],
        }
        out: dict[str, list[float]] = {}
        for name, flags in defines.items():
            if any(flags):
                total = sum(n for n, f in zip(n_tok, flags, strict=True) if f)
                out[name] = [n / total if f and total else 0.0 for n, f in zip(n_tok, flags, strict=True)]
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

        logprobs: (b, T) log pi_theta of the taken tokens of these rows, with gradient (finite
        everywhere; padding may hold any finite value). The micro-batch may drop trailing
        padding columns (T' <= T). entropy: (b, T) per-token entropy, needed for an entropy
        bonus and reported whenever passed. values: (b, T) new critic values (adv=gae).
        """
        idx = slice(None) if rows is None else rows
        mask = prep.response_mask if rows is None else prep.response_mask[idx]
        width = logprobs.shape[-1]
        if logprobs.dim() != 2 or logprobs.shape[0] != mask.shape[0] or width > mask.shape[1]:
            raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}; the rows need {tuple(mask.shape)}")
        if width < mask.shape[1]:
            if bool(mask[:, width:].any()):
                raise ValueError(f"logprobs has {width} columns; these rows have response tokens beyond them")
            mask = mask[:, :width]
        if entropy is None and any(t.spec.entropy or t.spec.ent_weight is not None for t in self.terms):
            raise ValueError(
                "this estimator has an entropy bonus or an entropy-aware weight: pass `entropy` "
                "(per-token entropy (b, T))"
            )
        lp, dt = logprobs, logprobs.dtype

        cut = width < prep.response_mask.shape[1]

        def take(x: Tensor) -> Tensor:
            """rows ``idx`` of a prepared tensor, cut to the micro-batch's columns, in lp's dtype."""
            if rows is not None:
                x = x[idx]
            if cut and x.dim() == 2 and x.shape[1] > 1:
                x = x[:, :width]
            return x if x.dtype == dt else x.to(dt)

        if prep.old_is_current:
            old: Tensor | None = lp.detach()
        else:
            old = None if prep.old_logprobs is None else take(prep.old_logprobs)
        ref = None if prep.ref_logprobs is None else take(prep.ref_logprobs)
        if entropy is not None:
            entropy = torch.where(mask, entropy, 0.0)
        mf_all, lengths_all = _float_mask(prep, dt)
        mf = take(mf_all)
        lengths = functools.cache(lambda: take(lengths_all))
        weight, metrics = mf, {}
        if isinstance(prep.tis, Tensor):
            weight = mf * take(prep.tis)
        elif prep.tis is not None:
            weight, metrics = self._live_tis(prep.tis, idx, width, lp, old, mf)

        weight_sums = lengths if weight is mf else functools.cache(lambda: weight.sum(dim=1, keepdim=True))
        total: Tensor | None = None
        per_term: dict[str, dict[str, Tensor]] = {}
        for k, term in enumerate(self.terms):
            if not prep.live[k]:
                metrics[f"loss/{term.name}"] = torch.zeros((), dtype=dt, device=lp.device)
                continue
            t = TokenInputs(lp, old, mask, mf, take(prep.adv[k]), lengths, uniform=weight is mf)
            obj, clipped, rho, kl = term.objective(t, ref, entropy)
            contrib = -torch.dot(_row_sum(obj, weight, weight_sums), take(prep.coef[k]))
            total = contrib if total is None else total + contrib
            metrics[f"loss/{term.name}"] = contrib.detach()
            per_term[term.name] = self._term_metrics(take(prep.tok[k]), mask, mf, lengths, clipped, rho, kl,
                                                     entropy, term.spec.denom != "pi_theta")  # fmt: skip
            for key, v in per_term[term.name].items():
                metrics[f"{key}/{term.name}"] = v
        if total is None:  # no term has a token: exactly 0, with a zero gradient path
            total = lp[:, :0].sum()
        for key, shares in prep.shares.items():
            parts = [
                (s, per_term[t.name][key])
                for s, t in zip(shares, self.terms, strict=True)
                if s and key in per_term.get(t.name, {})
            ]
            if len(parts) == 1 and parts[0][0] == 1.0:
                metrics[key] = parts[0][1]
            elif parts:
                metrics[key] = torch.stack([s * v for s, v in parts]).sum()
        keys, shares_matrix = _row_matrix(prep)
        if keys:
            sums = (shares_matrix if rows is None else shares_matrix[:, idx]).sum(dim=1)
            metrics.update(zip(keys, sums.to(dt).unbind(), strict=True))
        value_loss = None
        if values is not None and prep.returns is not None:
            value_loss = self._value_loss(prep, take, values, mf)
            metrics["value_loss"] = value_loss.detach()
        metrics["loss"] = total.detach()
        return LossOutput(loss=total, metrics=metrics, value_loss=value_loss)

    @staticmethod
    @torch.no_grad()
    def _term_metrics(
        tok: Tensor, mask: Tensor, mf: Tensor, lengths: Callable[[], Tensor], clipped: Tensor | None,
        rho: Tensor, kl: Tensor | None, entropy: Tensor | None, has_ratio: bool,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Token means over the term's active tokens: sum_i tok_i * sum_t m_{i,t} x_{i,t}."""
        out = {}
        if clipped is not None:
            if clipped.shape[1] == 1:
                out["clip_frac"] = torch.dot(clipped[:, 0] * lengths()[:, 0], tok)
            else:
                out["clip_frac"] = torch.dot((clipped & mask).sum(dim=1, dtype=tok.dtype), tok)
        if has_ratio:
            out["ratio_mean"] = torch.dot(_row_sum(rho, mf, lengths), tok)
        if kl is not None:
            out["kl"] = torch.dot(kl.sum(dim=1), tok)  # kl is 0 off the response
        if entropy is not None:
            out["entropy"] = torch.dot(entropy.sum(dim=1).to(tok.dtype), tok)
        return out

    @staticmethod
    @torch.no_grad()
    def _live_tis(
        tis: tuple[Tensor, Tensor, float, float], idx: slice | Tensor, width: int, lp: Tensor,
        old: Tensor | None, mf: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """Truncated IS weights min(pi_old / pi_rollout, C) when pi_old is the live policy. The
        metrics are shares of the mini-batch's n rollout tokens (n counted at prepare, over all
        processes), so the parts of micro-batches and of processes add up."""
        rlp, rmask, cap, n = tis
        rm = rmask[idx][:, :width]
        base = lp.detach() if old is None else old
        log_w = torch.where(rm, base - rlp[idx][:, :width].to(lp.dtype), 0.0)
        metrics = {
            "tis/trunc_frac": (rm & (log_w.exp() > cap)).sum() / n,
            "tis/mismatch": log_w.abs().sum() / n,
        }
        return mf * torch.where(rm, log_w.exp().clamp(max=cap), 1.0), metrics

    def _value_loss(
        self, prep: Prepared, take: Callable[[Tensor], Tensor], values: Tensor, mf: Tensor
    ) -> Tensor:
        """coef * sum_i v_i * sum_t m 0.5 max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2)   (PPO),
        G the GAE returns, v_i = [critic row] / N_critic (a token mean over the critic's tokens)."""
        eps = (self.settings.critic or CriticSettings()).value_clip
        ret = take(prep.returns).to(values.dtype)  # type: ignore[arg-type]
        v_old = take(prep.old_values).to(values.dtype)  # type: ignore[arg-type]
        v_clip = v_old + (values - v_old).clamp(-eps, eps)
        vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
        return ((vf * mf.to(values.dtype)).sum(dim=1) * take(prep.value_coef).to(values.dtype)).sum()  # type: ignore[arg-type]

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
        """prepare + loss over the whole batch in one call (``values`` also serve as the old values)."""
        prep = self.prepare(
            response_mask=response_mask, rewards=rewards, group_ids=group_ids, is_demo=is_demo,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
            values=None if values is None else values.detach(), rollout_logprobs=rollout_logprobs, step=step,
        )  # fmt: skip
        return self.loss(prep, logprobs=logprobs, entropy=entropy, values=values)


def _float_mask(prep: Prepared, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The response mask as floats (B, T) and the response lengths (B, 1), built once per
    Prepared and dtype."""
    key = f"_float_mask_{dtype}"
    if key not in prep.__dict__:
        mf = prep.response_mask.to(dtype)
        prep.__dict__[key] = (mf, mf.sum(dim=1, keepdim=True))
    return prep.__dict__[key]


def _row_matrix(prep: Prepared) -> tuple[list[str], Tensor]:
    """The batch-level metrics' per-row shares as one (K, B) matrix (built once per Prepared),
    so that a micro-batch sums all of them in one operation."""
    cached = prep.__dict__.get("_row_matrix")
    if cached is None or cached[0] != list(prep.row_metrics):
        keys = list(prep.row_metrics)
        dtype = (
            torch.float64
            if any(v.dtype == torch.float64 for v in prep.row_metrics.values())
            else torch.float32
        )
        matrix = (
            torch.stack([v.to(dtype) for v in prep.row_metrics.values()])
            if keys
            else prep.response_mask.new_zeros(0)
        )
        cached = prep.__dict__["_row_matrix"] = (keys, matrix)
    return cached


def _row_sum(x: Tensor, weight: Tensor, weight_sums: Callable[[], Tensor]) -> Tensor:
    """sum_t weight_{i,t} x_{i,t} per row; x may be (b, 1), one value per row
    (weight_sums() = sum_t weight_{i,t}, (b, 1))."""
    if x.shape[1] == 1:
        return x[:, 0] * weight_sums()[:, 0]
    return (x * weight).sum(dim=1)


def _rows(which: str, demo: Tensor) -> Tensor:
    """The rows ``on=`` / ``group=`` selects."""
    if which == "rollouts":
        return ~demo
    if which == "demos":
        return demo.clone()
    return torch.ones_like(demo)


def _clean(xs: list[Tensor | None], mask: Tensor, dtype: torch.dtype) -> list[Tensor | None]:
    """Each x with 0 off the response (padding may hold anything, even inf or NaN). A tensor
    whose padding is already 0 is used as it is (no copy); one synchronisation for all."""
    xs = [None if x is None else x.to(device=mask.device, dtype=dtype) for x in xs]
    given = [x for x in xs if x is not None]
    if not given:
        return xs
    pad = ~mask
    dirty = torch.stack([(x * pad).any() for x in given]).tolist()  # inf * 0 and NaN * 0 are NaN: dirty
    flags = iter(dirty)
    return [None if x is None else torch.where(mask, x, 0.0) if next(flags) else x for x in xs]


def _builtin(mask_fn: Callable[..., Any]) -> bool:
    """True for the masks of ``hpt_dsl.estimator.mask`` (J a multiple of A) and for a plugin's
    mask that declares ``zero_at_zero_adv=True`` (``hpt-dsl verify`` checks that claim); a
    mask registered otherwise may not be."""
    if getattr(mask_fn, "declared", {}).get("zero_at_zero_adv"):
        return True
    return getattr(mask_fn, "__module__", "") == "hpt_dsl.estimator.mask"


def _step_whitened(spec: EstimatorSpec) -> bool:
    """True when the estimator's advantage is standardised over the whole step."""
    if spec.adv.name == "gae":
        return gae_whitens(spec.adv.args)
    return spec.adv.name in ("batch_norm", "token_whiten")
