"""Gates: the loss expression, evaluated per question.

A loss is linear in its estimator terms, so the tree of sums, scales and gates flattens
to a list of (estimator, weight) pairs, the weight a function of the per-question
statistics (acc, solved, reward_mean, reward_std, n) and the global step:

    Term(e)                    ->  [(e, 1)]
    Scale(c, L)                ->  [(e, c * w) for (e, w) in L]
    Sum(L1, ..., Lk)           ->  L1 ++ ... ++ Lk
    if c1 then L1 elif c2 then L2 else L3
                               ->  [(e, [c1] * w) for L1] ++ [(e, [not c1 and c2] * w) for L2]
                                   ++ [(e, [not c1 and not c2] * w) for L3]

Pairs with the same estimator are merged by adding their weights, so ``if c then grpo
else grpo`` is exactly ``grpo``. Every row takes the weight of its question.

Each pair also carries its normaliser's ``Scope`` (``hpt_dsl.recipe.scoped_terms``):
``joint(L)`` puts the terms of L in one normaliser group, ``per_question(L)`` takes their
counts per question and weighs each question 1/Q. Only pairs of equal estimator and scope merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_dsl.recipe import (
    Arith,
    BoolOp,
    Compare,
    Cond,
    Const,
    EstimatorSpec,
    Gate,
    Joint,
    LossExpr,
    Neg,
    Not,
    PerQuestion,
    Scalar,
    Scale,
    Scope,
    Stat,
    Sum,
    Term,
    Zero,
    scoped_terms,
    show_cond,
)

Stats = dict[str, Tensor]
"""statistic name -> (Q,) float tensor (``step`` broadcast to (Q,))."""
WeightFn = Callable[[Stats], Tensor]


def scalar(e: Scalar, stats: Stats) -> Tensor:
    """Evaluate a scalar expression to a (Q,) tensor."""
    if isinstance(e, Const):
        return torch.full_like(stats["n"], float(e.value))
    if isinstance(e, Stat):
        return stats[e.name]
    if isinstance(e, Neg):
        return -scalar(e.operand, stats)
    if isinstance(e, Arith):
        a, b = scalar(e.left, stats), scalar(e.right, stats)
        return {"+": a + b, "-": a - b, "*": a * b}[e.op] if e.op != "/" else a / b
    raise TypeError(f"not a scalar expression: {e!r}")


_CMP = {
    "<": torch.lt,
    "<=": torch.le,
    ">": torch.gt,
    ">=": torch.ge,
    "==": torch.eq,
    "!=": torch.ne,
}


def cond(c: Cond, stats: Stats) -> Tensor:
    """Evaluate a condition to a (Q,) bool tensor."""
    if isinstance(c, Compare):
        return _CMP[c.op](scalar(c.left, stats), scalar(c.right, stats))
    if isinstance(c, Not):
        return ~cond(c.operand, stats)
    if isinstance(c, BoolOp):
        out = cond(c.items[0], stats)
        for item in c.items[1:]:
            out = (out & cond(item, stats)) if c.op == "and" else (out | cond(item, stats))
        return out
    raise TypeError(f"not a condition: {c!r}")


@dataclass(frozen=True)
class Branch:
    """One branch of a gate: its metric label and whether each question takes it."""

    label: str
    taken: WeightFn


def _one(stats: Stats) -> Tensor:
    return torch.ones_like(stats["n"])


Pairs = list[tuple[EstimatorSpec, WeightFn, Scope]]


def flatten(loss: LossExpr, path: WeightFn = _one) -> tuple[Pairs, list[Branch]]:
    """(estimator, weight, scope) triples of a loss tree, and every gate branch (for metrics).

    ``path`` is the indicator of the gate branches above this node; each term's scope is the
    one ``scoped_terms`` gives it (terms in the same left-to-right order). A joint group must
    not mix per-question and mini-batch terms.
    """
    weighted, branches = _flatten(loss, path)
    scoped = scoped_terms(loss)
    pairs: Pairs = []
    for (term, weight), (same, scope) in zip(weighted, scoped, strict=True):
        assert term is same, "the gate's walk and scoped_terms visit the terms in one order"
        pairs.append((term.estimator, weight, scope))
    flags: dict[int, set[bool]] = {}
    for _, _, sc in pairs:
        if sc.joint is not None:
            flags.setdefault(sc.joint, set()).add(sc.per_question)
    if any(len(f) > 1 for f in flags.values()):
        raise ValueError("a joint(...) normaliser cannot mix per_question terms with mini-batch terms")
    return pairs, branches


def _flatten(loss: LossExpr, path: WeightFn) -> tuple[list[tuple[Term, WeightFn]], list[Branch]]:
    """(term, weight) pairs and gate branches, left to right."""
    if isinstance(loss, Zero):
        return [], []
    if isinstance(loss, Term):
        return [(loss, path)], []
    if isinstance(loss, Joint | PerQuestion):  # normaliser scopes: scoped_terms
        return _flatten(loss.loss, path)
    if isinstance(loss, Scale):
        terms, branches = _flatten(loss.loss, path)
        coef = loss.coef
        return [(t, _times(coef, w)) for t, w in terms], branches
    if isinstance(loss, Sum):
        terms, branches = [], []
        for item in loss.items:
            t, b = _flatten(item, path)
            terms += t
            branches += b
        return terms, branches
    if isinstance(loss, Gate):
        terms, branches = [], []
        conds = [c for c, _ in loss.branches]
        arms = [(_taken(conds[:j], c, path), body, show_cond(c)) for j, (c, body) in enumerate(loss.branches)]
        arms.append((_taken(conds, None, path), loss.orelse, "else"))
        for taken, body, label in arms:
            branches.append(Branch(label, taken))
            t, b = _flatten(body, taken)
            terms += t
            branches += b
        return terms, branches
    raise TypeError(f"not a loss expression: {loss!r}")


def _times(coef: Scalar, w: WeightFn) -> WeightFn:
    return lambda stats: scalar(coef, stats) * w(stats)


def _taken(before: list[Cond], this: Cond | None, path: WeightFn) -> WeightFn:
    """path * [no earlier condition holds] * [this condition holds]."""

    def fn(stats: Stats) -> Tensor:
        ok = torch.ones_like(stats["n"], dtype=torch.bool)
        for c in before:
            ok = ok & ~cond(c, stats)
        if this is not None:
            ok = ok & cond(this, stats)
        return path(stats) * ok.to(stats["n"].dtype)

    return fn


def merged(terms: Pairs) -> Pairs:
    """Merge triples with equal estimators and scopes by adding their weights (first
    occurrence keeps the name)."""
    out: list[tuple[EstimatorSpec, list[WeightFn], Scope]] = []
    for spec, w, scope in terms:
        for kept, ws, sc in out:
            if kept == spec and sc == scope:
                ws.append(w)
                break
        else:
            out.append((spec, [w], scope))
    return [(spec, ws[0] if len(ws) == 1 else _sum(ws), sc) for spec, ws, sc in out]


def _sum(ws: list[WeightFn]) -> WeightFn:
    def fn(stats: Stats) -> Tensor:
        total = ws[0](stats)
        for w in ws[1:]:
            total = total + w(stats)
        return total

    return fn
