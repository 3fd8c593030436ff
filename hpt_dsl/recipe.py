"""The checked recipe: what the checker hands to the compiler and the training loop.

Everything here is plain, frozen data with no torch import. The language front end
(``hpt_dsl.lang``) builds it from text; ``hpt_dsl.estimator.compile`` turns it into a
loss program; ``hpt_dsl.train`` reads ``needs`` to skip work the recipe does not use.

An estimator is the four parts of the unified policy gradient

    grad = 1_stable * (1 / pi_ref) * A_hat * grad(pi_theta)
           (mask)     (denom)        (adv)   (grad)

plus how token losses are aggregated (agg), which rows it applies to (on), which rows
form an advantage group (group), and optional regularizers (kl, entropy).

A loss is a tree over estimators: weighted sums and gates whose conditions and
coefficients are scalar expressions over per-question statistics and the global step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hpt_dsl.settings import Settings


@dataclass(frozen=True)
class Call:
    """A component value: a name and numeric arguments, e.g. ``clip(0.2, 0.28)``."""

    name: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(_num(a) for a in self.args)})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


Denom = Literal["pi_theta", "pi_old", "pi_old_seq", "1"]
Rows = Literal["rollouts", "demos", "rollouts+demos"]


@dataclass(frozen=True)
class EstimatorSpec:
    """One fully resolved estimator (every component explicit, arguments normalised).

    mask:    none | clip(lo, hi) | dual_clip(lo, hi, c) | cispo(hi) | seq_clip(lo, hi)
    denom:   pi_theta | pi_old | pi_old_seq | 1
    adv:     const(c) | reward | group_norm | group_mean | rloo | batch_norm | gae(gamma, lambda)
    grad:    loglik | shaped(g)
    agg:     token_mean | seq_mean_token_mean | seq_mean_token_sum | token_sum_norm(L)
    on:      rollouts | demos | rollouts+demos        (rows whose tokens carry this loss)
    group:   rollouts | rollouts+demos                (rows pooled for group advantages)
    kl:      None | k1(coef) | k2(coef) | k3(coef)    (to the frozen reference model)
    entropy: entropy bonus coefficient (0 = none)
    ent_weight: None | exp(s, c) | pos_exp(s, c)      (entropy-aware row weight c * sg(exp(s * H_i)),
             H_i the row's mean token entropy; pos_exp: rows with A > 0 only; SRFT)
    """

    mask: Call = Call("none")
    denom: Denom = "pi_theta"
    adv: Call = Call("const", (1.0,))
    grad: Call = Call("loglik")
    agg: Call = Call("token_mean")
    on: Rows = "rollouts"
    group: Rows = "rollouts"
    kl: Call | None = None
    entropy: float = 0.0
    ent_weight: Call | None = None
    name: str | None = field(default=None, compare=False)

    def components(self) -> str:
        """The estimator written back in the language (every component)."""
        parts = [
            f"mask={self.mask}",
            f"denom={self.denom}",
            f"adv={self.adv}",
            f"grad={self.grad}",
            f"agg={self.agg}",
            f"on={self.on}",
        ]
        if self.group != "rollouts":
            parts.append(f"group={self.group}")
        if self.kl is not None:
            parts.append(f"kl={self.kl}")
        if self.entropy:
            parts.append(f"entropy={_num(self.entropy)}")
        if self.ent_weight is not None:
            parts.append(f"ent_weight={self.ent_weight}")
        return " ".join(parts)


OLD_DENOMS = ("pi_old", "pi_old_seq")
GROUP_ADVANTAGES = ("group_norm", "group_mean", "rloo")
"""Advantages computed within a question's group (they need group ids and n >= 2)."""


def estimator_needs(s: EstimatorSpec, declared: dict[tuple[str, str], tuple[str, ...]] | None = None) -> set[str]:
    """What one estimator reads besides pi_theta's log-probs: old_logprobs, ref_model, critic,
    entropy. The one rule the checker, the compiler and the loss program share; ``declared``
    adds the needs plugins declare for their components, by (kind, name)."""
    out: set[str] = set()
    if s.denom in OLD_DENOMS or s.mask.name in ("cispo", "seq_clip"):
        out.add("old_logprobs")
    if s.kl is not None:
        out.add("ref_model")
    if s.adv.name == "gae":
        out.add("critic")
    if s.entropy or s.ent_weight is not None:
        out.add("entropy")
    for kind, value in (("mask", s.mask), ("denom", s.denom), ("adv", s.adv), ("grad", s.grad), ("agg", s.agg),
                        ("kl", s.kl)):  # fmt: skip
        name = value if isinstance(value, str) else getattr(value, "name", None)
        out.update((declared or {}).get((kind, str(name)), ()))
    return out


# ----- scalar expressions (per question, or global) -------------------------------------

STATS = ("acc", "solved", "reward_mean", "reward_std", "n", "step")
"""acc: pass rate of the question's rollouts; solved: number of correct rollouts;
reward_mean / reward_std: over its rollouts; n: rollouts per question; step: global step."""


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Stat:
    name: str  # one of STATS


@dataclass(frozen=True)
class Arith:
    op: Literal["+", "-", "*", "/"]
    left: Scalar
    right: Scalar


@dataclass(frozen=True)
class Neg:
    operand: Scalar


Scalar = Const | Stat | Arith | Neg


@dataclass(frozen=True)
class Compare:
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    left: Scalar
    right: Scalar


@dataclass(frozen=True)
class BoolOp:
    op: Literal["and", "or"]
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class Not:
    operand: Cond


Cond = Compare | BoolOp | Not


# ----- loss expressions --------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One estimator, weight 1."""

    estimator: EstimatorSpec


@dataclass(frozen=True)
class Scale:
    """coef * loss, coef a scalar expression (may depend on per-question statistics)."""

    coef: Scalar
    loss: LossExpr


@dataclass(frozen=True)
class Sum:
    items: tuple[LossExpr, ...]


@dataclass(frozen=True)
class Gate:
    """if c1 then l1 elif c2 then l2 ... else orelse, decided per question."""

    branches: tuple[tuple[Cond, LossExpr], ...]
    orelse: LossExpr


@dataclass(frozen=True)
class Zero:
    """The empty loss (``0`` in a loss position)."""


@dataclass(frozen=True)
class Joint:
    """``joint(L)``: the terms of L share one normaliser. Each term's aggregation counts
    (N_tok, N_seq) are taken over the union of the rows of every term of L, e.g. LUFFY's

        joint(on + off) = (1 / N_tok(rollouts ∪ demos)) Σ_{i,t} (l^on_{i,t} + l^off_{i,t})

    instead of ``on + off``, where each term divides by its own token count."""

    loss: LossExpr


@dataclass(frozen=True)
class PerQuestion:
    """``per_question(L)``: L is a per-question loss, averaged over the questions of the
    optimizer mini-batch (HPT, Eq. 10-13):

        (1/Q) Σ_q L_q,   L_q = L with every aggregation count taken over question q's rows

    so each question weighs 1/Q whichever gate branch it takes."""

    loss: LossExpr


LossExpr = Term | Scale | Sum | Gate | Zero | Joint | PerQuestion


@dataclass(frozen=True)
class Needs:
    """What a run of this recipe needs; the loop skips everything else."""

    rollouts: bool = False
    demos: bool = False
    old_logprobs: bool = False
    ref_model: bool = False
    critic: bool = False
    entropy: bool = False


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: the loss tree, its named estimators, settings and needs."""

    loss: LossExpr
    estimators: dict[str, EstimatorSpec]
    settings: Settings
    needs: Needs
    source: str = ""
    path: str = "<recipe>"
    warnings: tuple[Any, ...] = field(default=(), compare=False)
    """Warnings found by the checker (``hpt_dsl.lang.Diagnostic``); a recipe with errors is never built."""
    plugins: tuple[Any, ...] = field(default=(), compare=False)
    """The plugins its ``use`` lines name (``hpt_dsl.lang.plugins.Plugin``), imported by ``compile``."""


# ----- one walk of the loss tree, one way to print a condition (checker, compiler, explain) -----


def terms(loss: LossExpr) -> list[Term]:
    """Every estimator term of a loss tree, left to right."""
    out: list[Term] = []
    stack: list[LossExpr] = [loss]
    while stack:
        node = stack.pop()
        if isinstance(node, Term):
            out.append(node)
        elif isinstance(node, Scale | Joint | PerQuestion):
            stack.append(node.loss)
        elif isinstance(node, Sum):
            stack.extend(reversed(node.items))
        elif isinstance(node, Gate):
            stack.append(node.orelse)
            stack.extend(b for _, b in reversed(node.branches))
    return out


@dataclass(frozen=True)
class Scope:
    """Over which rows a term's aggregation counts (N_tok, N_seq) are taken.

    joint:        the ``joint(...)`` group the term belongs to, numbered 1, 2, ... in the
                  order the groups open: its counts are over the union of the rows of the
                  group's terms (None: over the term's own rows);
    per_question: counts per question, and the term's weight times 1/Q (``per_question(...)``).
    """

    joint: int | None = None
    per_question: bool = False


def scoped_terms(loss: LossExpr) -> list[tuple[Term, Scope]]:
    """Every estimator term of a loss tree, left to right (as ``terms``), with its normaliser
    scope: a ``joint`` opens a group (a ``joint`` inside another joins the outer one), a
    ``per_question`` sets per-question counts for everything under it. The one walk of the
    scopes: the compiler's gate and ``explain`` both read it."""
    out: list[tuple[Term, Scope]] = []
    groups = 0
    stack: list[tuple[LossExpr, Scope]] = [(loss, Scope())]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, Term):
            out.append((node, scope))
        elif isinstance(node, Joint):
            if scope.joint is None:
                groups += 1
                scope = Scope(groups, scope.per_question)
            stack.append((node.loss, scope))
        elif isinstance(node, PerQuestion):
            stack.append((node.loss, Scope(scope.joint, True)))
        elif isinstance(node, Scale):
            stack.append((node.loss, scope))
        elif isinstance(node, Sum):
            stack.extend((item, scope) for item in reversed(node.items))
        elif isinstance(node, Gate):
            stack.append((node.orelse, scope))
            stack.extend((b, scope) for _, b in reversed(node.branches))
    return out


def stats_used(loss: LossExpr) -> set[str]:
    """The statistics a loss tree's gate conditions and coefficients read."""
    found: set[str] = set()
    stack: list[object] = [loss]
    while stack:
        node = stack.pop()
        if isinstance(node, Stat):
            found.add(node.name)
        elif isinstance(node, Scale):
            stack += [node.coef, node.loss]
        elif isinstance(node, Joint | PerQuestion):
            stack.append(node.loss)
        elif isinstance(node, Sum):
            stack += list(node.items)
        elif isinstance(node, Gate):
            stack.append(node.orelse)
            for c, b in node.branches:
                stack += [c, b]
        elif isinstance(node, Arith | Compare):
            stack += [node.left, node.right]
        elif isinstance(node, Neg | Not):
            stack.append(node.operand)
        elif isinstance(node, BoolOp):
            stack += list(node.items)
    return found


def num(x: float) -> str:
    """A number as the language writes it: 8, 0.2, 1e-06."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.6g}"


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def show_scalar(x: Scalar, outer: int = 0) -> str:
    """A scalar expression as the language writes it, with only the brackets it needs."""
    if isinstance(x, Const):
        return num(x.value)
    if isinstance(x, Stat):
        return x.name
    if isinstance(x, Neg):
        return f"-{show_scalar(x.operand, 3)}"
    if isinstance(x, Arith):
        p = _PREC[x.op]
        text = f"{show_scalar(x.left, p)} {x.op} {show_scalar(x.right, p + 1)}"
        return f"({text})" if p < outer else text
    return "?"


def show_cond(c: Cond) -> str:
    """A condition as the language writes it (``acc > 0.125``); gate branches are named by it."""
    if isinstance(c, Compare):
        return f"{show_scalar(c.left)} {c.op} {show_scalar(c.right)}"
    if isinstance(c, Not):
        return f"not ({show_cond(c.operand)})"
    if isinstance(c, BoolOp):
        return f" {c.op} ".join(f"({show_cond(i)})" if isinstance(i, BoolOp) else show_cond(i) for i in c.items)
    return "?"
