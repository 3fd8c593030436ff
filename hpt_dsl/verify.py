"""``hpt-dsl verify``: the proofs the stock components have, run on every estimator of a
recipe, a plugin's included, on random float64 batches (several questions, unequal lengths,
demonstrations, zero-variance groups, clipped tokens). Nothing is assumed from a name.

    upge        autograd's gradient = the unified gradient 1_stable * (1/pi_ref) * A * grad(pi_theta)
                times the aggregation weight: per token, the gradient divided by that of the same
                estimator with mask=none is 0 or 1 (a stable mask); CISPO's is in [0, 1] (a weight)
    split       any split into micro-batches, and the shares of several processes, sum to the
                full mini-batch's loss, gradient and metrics; an advantage declared per question
                is the same when computed on any split that keeps questions whole
    finite      loss and gradient stay finite on the edge cases: every group of equal rewards,
                no demonstration, only demonstrations, every token clipped, log-ratios of +-30,
                one rollout per question
    silent      a row whose every advantage is 0 has no loss and no gradient (on-policy), so a
                learner may skip it; checked where the mask claims it (built-in masks, or a
                plugin's zero_at_zero_adv=True), reported elsewhere
    normalised  the aggregation's weights sum to 1 over the mini-batch (sum_i a_i |y_i| for
                token weights, sum_i a_i over non-empty rows for row weights); n/a for a constant

``verify(recipe)`` returns the results; a result is ok, failed or not applicable, with the
largest deviation found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.estimator import compile_recipe, compile_spec
from hpt_dsl.estimator.program import LossProgram
from hpt_dsl.estimator.registry import lookup
from hpt_dsl.recipe import Call, EstimatorSpec, Recipe

PROPERTIES = ("upge", "split", "finite", "silent", "normalised")
TOL = 1e-8
D = torch.float64

BATCH_SCOPE_ADVS = ("batch_norm", "token_whiten", "gae")
"""Built-in advantages standardised over the batch (taken over the step by the loop)."""
WEIGHTS = {"token_mean": "tokens", "seq_mean_token_mean": "tokens", "seq_mean_token_sum": "rows"}
"""How the built-in aggregations' weights sum; the others divide by a constant."""


@dataclass(frozen=True)
class Result:
    prop: str
    term: str
    ok: bool | None  # None: not applicable
    deviation: float = 0.0
    note: str = ""

    @property
    def mark(self) -> str:
        return "–" if self.ok is None else "✓" if self.ok else "✗"


def verify(recipe: Recipe, seed: int = 0) -> list[Result]:
    """Every property of every estimator of ``recipe`` (see the module docstring)."""
    compile_recipe(recipe)  # imports and registers the recipe's plugins
    out: list[Result] = []
    for name, spec in recipe.estimators.items():
        for prop, fn in CHECKS.items():
            try:
                out.append(fn(name, spec, recipe, seed))
            except Exception as e:  # a component that raises is a failure, reported, never a traceback
                out.append(Result(prop, name, False, math.inf, f"{type(e).__name__}: {e}"))
    return out


# ----- batches ----------------------------------------------------------------------------------


def batch(seed: int, *, rewards: list[list[float]] | None = None, demos: bool = True, T: int = 9,
          shift: float | None = None, rollouts: bool = True) -> dict[str, Tensor]:  # fmt: skip
    """Questions of n rollouts (+ one demonstration each), unequal lengths with one empty
    rollout, old log-probs that differ from the current ones (some ratios clipped)."""
    g = torch.Generator().manual_seed(seed)
    rewards = rewards or [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 1]]
    gid, demo, R = [], [], []
    for q, rs in enumerate(rewards):
        for r in rs if rollouts else []:
            gid, demo, R = gid + [q], demo + [False], R + [float(r)]
        if demos:
            gid, demo, R = gid + [q], demo + [True], R + [1.0]
    B = len(gid)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if B > 1 and rollouts:
        lengths[1] = 0
    mask = torch.arange(T)[None] < lengths[:, None]
    lp = -2.0 * torch.rand(B, T, generator=g, dtype=D) - 0.05
    old = lp + (0.4 * torch.randn(B, T, generator=g, dtype=D) if shift is None else shift)
    return dict(
        lp=lp, old_logprobs=old, response_mask=mask, group_ids=torch.tensor(gid), is_demo=torch.tensor(demo),
        rewards=torch.tensor(R, dtype=D), ref_logprobs=lp + 0.3 * torch.randn(B, T, generator=g, dtype=D),
        values=torch.randn(B, T, generator=g, dtype=D), entropy=2 * torch.rand(B, T, generator=g, dtype=D),
    )  # fmt: skip


def _prepare(prog: LossProgram, b: dict[str, Tensor], **kw: Any) -> Any:
    inputs = {k: v for k, v in b.items() if k not in ("lp", "entropy")}
    return prog.prepare(**inputs, **kw)


def _run(
    prog: LossProgram, b: dict[str, Tensor], rows: Tensor | None = None, prep: Any = None
) -> tuple[Tensor, Tensor, dict[str, float]]:
    prep = prep if prep is not None else _prepare(prog, b)
    lp = b["lp"].clone().requires_grad_()
    part = lp if rows is None else lp[rows]
    ent = b["entropy"] if rows is None else b["entropy"][rows]
    values = None if prep.returns is None else (b["values"] if rows is None else b["values"][rows])
    out = prog.loss(prep, logprobs=part, rows=rows, entropy=ent, values=values)
    total = out.loss + (out.value_loss if out.value_loss is not None else 0.0)
    total.backward()
    grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
    return out.loss.detach(), grad, {k: float(v) for k, v in out.metrics.items()}


def _program(spec: EstimatorSpec, recipe: Recipe) -> LossProgram:
    return compile_spec(spec, recipe.settings)


# ----- the properties -----------------------------------------------------------------------------


def check_upge(name: str, spec: EstimatorSpec, recipe: Recipe, seed: int) -> Result:
    policy = replace(spec, kl=None, entropy=0.0)
    reference = replace(policy, mask=Call("none"))
    if spec.mask.name == "cispo":  # CISPO differentiates log pi_theta: its reference is pi_old's ratio
        reference = replace(reference, denom="pi_old")
    binary = spec.mask.name != "cispo" and _declared(lookup("mask", spec.mask.name)).get("upge", True)
    worst, seen = 0.0, 0
    for s in range(3):
        b = batch(seed + s)
        _, g, _ = _run(_program(policy, recipe), b)
        _, g0, _ = _run(_program(reference, recipe), b)
        live = g0.abs() > 1e-12
        seen += int(live.sum())
        ratio = torch.where(live, g / torch.where(live, g0, 1.0), 0.0)
        if binary:
            dev = torch.minimum(ratio.abs(), (ratio - 1).abs())
        else:
            dev = torch.clamp(-ratio, min=0) + torch.clamp(ratio - 1, min=0)
        worst = max(worst, float(dev[live].max()) if live.any() else 0.0, float(g[~live].abs().max()))
    if seen == 0:
        return Result("upge", name, None, 0.0, "no token has a gradient (A = 0)")
    note = "1_stable ∈ {0, 1}" if binary else "1_stable ∈ [0, 1] (a weight)"
    return Result("upge", name, worst < 1e-6, worst, note)


def check_split(name: str, spec: EstimatorSpec, recipe: Recipe, seed: int) -> Result:
    prog = _program(spec, recipe)
    b = batch(seed)
    prep = _prepare(prog, b)
    full_loss, full_grad, full_metrics = _run(prog, b, prep=prep)
    B = b["rewards"].shape[0]
    worst = 0.0
    g = torch.Generator().manual_seed(seed)
    splits = [list(torch.randperm(B, generator=g).split(k)) for k in (1, 3, 7)]
    for parts in splits:
        loss, grad, metrics = 0.0, torch.zeros_like(full_grad), {}
        for rows in parts:
            lo, gr, me = _run(prog, b, rows, prep)
            loss, grad = loss + float(lo), grad + gr
            for k, v in me.items():
                metrics[k] = metrics.get(k, 0.0) + v
        worst = max(worst, abs(loss - float(full_loss)), float((grad - full_grad).abs().max()))
        worst = max([worst] + [abs(metrics.get(k, 0.0) - v) for k, v in full_metrics.items()])
    # the shares of two processes: the global prepare, each process's rows
    cut = int((b["group_ids"] < 3).sum())
    loss = 0.0
    for rows in (torch.arange(cut), torch.arange(cut, B)):
        share = prep.local(slice(int(rows[0]), int(rows[-1]) + 1), b["lp"].shape[1])
        loss += float(_run(prog, {k: v[rows] for k, v in b.items()}, prep=share)[0])
    worst = max(worst, abs(loss - float(full_loss)))
    note = ""
    scope = _declared(lookup("adv", spec.adv.name)).get("scope") if spec.adv.name not in BATCH_SCOPE_ADVS else "batch"
    if scope in (None, "question"):  # the advantage of a row must not depend on other questions' rows
        full = prep.adv[0]
        for rows in (torch.arange(cut), torch.arange(cut, B)):
            part = _prepare(prog, {k: v[rows] for k, v in b.items()})
            active = part.coef[0] != 0
            diff = (part.adv[0] - full[rows]).abs()
            worst = max(worst, float(diff[active].max()) if active.any() else 0.0)
        note = "advantage per question"
    return Result("split", name, worst < 1e-9, worst, note)


EDGES: dict[str, Callable[[int], dict[str, Tensor]]] = {
    "equal rewards": lambda s: batch(s, rewards=[[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]),
    "no demonstration": lambda s: batch(s, demos=False),
    "only demonstrations": lambda s: batch(s, rollouts=False),
    "every token clipped": lambda s: batch(s, shift=-3.0),
    "log-ratio +30": lambda s: batch(s, shift=-30.0),
    "log-ratio -30": lambda s: batch(s, shift=30.0),
    "one rollout": lambda s: batch(s, rewards=[[1], [0], [1]]),
}


def check_finite(name: str, spec: EstimatorSpec, recipe: Recipe, seed: int) -> Result:
    prog = _program(spec, recipe)
    bad = []
    for label, make in EDGES.items():
        b = make(seed)
        if spec.kl is not None:
            b["ref_logprobs"] = b["lp"] + 25.0 * torch.sign(torch.randn_like(b["lp"]))
        loss, grad, _ = _run(prog, b)
        if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
            bad.append(label)
    return Result("finite", name, not bad, float(len(bad)), ", ".join(bad) or f"{len(EDGES)} edge cases")


def check_silent(name: str, spec: EstimatorSpec, recipe: Recipe, seed: int) -> Result:
    mask_fn = lookup("mask", spec.mask.name)
    claimed = getattr(mask_fn, "__module__", "") == "hpt_dsl.estimator.mask" or _declared(mask_fn).get(
        "zero_at_zero_adv", False)  # fmt: skip
    if spec.kl is not None or spec.entropy or spec.adv.name == "gae":
        return Result("silent", name, None, 0.0, "a KL, entropy or critic term: rows are never skipped")
    prog = _program(spec, recipe)
    b = batch(seed)
    b["old_logprobs"] = b["lp"].clone()  # on-policy: pi_old is the live policy
    prep = _prepare(prog, b)
    zero = ((prep.adv[0] == 0) | ~b["response_mask"]).all(dim=1) & (b["response_mask"].any(dim=1))
    if not zero.any():
        return Result("silent", name, None, 0.0, "no row has every advantage 0")
    rows = torch.nonzero(zero).squeeze(1)
    loss, grad, _ = _run(prog, b, rows, prep)
    dev = max(abs(float(loss)), float(grad.abs().max()))
    holds = dev < 1e-12
    if claimed:
        return Result("silent", name, holds, dev, "claimed: the learner skips these rows")
    note = "holds, not used: declare zero_at_zero_adv=True" if holds else "does not hold: rows are forwarded"
    return Result("silent", name, None, dev, note)


def check_normalised(name: str, spec: EstimatorSpec, recipe: Recipe, seed: int) -> Result:
    kind = WEIGHTS.get(spec.agg.name) or _declared(lookup("agg", spec.agg.name)).get("weights")
    if kind is None and spec.agg.name in ("token_sum_norm", "token_sum"):
        kind = "constant"
    kind = kind or "tokens"
    if kind == "constant":
        return Result("normalised", name, None, 0.0, "a constant divisor")
    prog = _program(replace(spec, kl=None, entropy=0.0), recipe)
    worst = 0.0
    for s in range(3):
        b = batch(seed + s)
        prep = _prepare(prog, b)
        c = prep.coef[0]
        L = b["response_mask"].sum(dim=1).to(D)
        if not (c != 0).any():
            continue
        total = float((c * L).sum()) if kind == "tokens" else float(c[L > 0].sum())
        worst = max(worst, abs(total - 1.0))
    return Result("normalised", name, worst < 1e-9, worst, f"{kind} weights sum to 1")


CHECKS: dict[str, Callable[[str, EstimatorSpec, Recipe, int], Result]] = {
    "upge": check_upge,
    "split": check_split,
    "finite": check_finite,
    "silent": check_silent,
    "normalised": check_normalised,
}


def _declared(fn: Callable[..., Any]) -> dict[str, Any]:
    return dict(getattr(fn, "declared", {}) or {})
