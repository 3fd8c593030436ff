"""The semantic checker: syntax tree + settings -> the checked loss tree of recipe.py.

Every expression evaluates to one of five kinds of value:

    Num    a constant number (folded: ``1/8`` is 0.125)
    Scal   a scalar over statistics (``1 - acc``), a coefficient
    CondV  a condition (``acc > gamma``), only allowed in ``if``
    EstV   one estimator, its components with where each was written
    LossV  a loss tree (sums, scales, gates over estimators)

and each operator says which kinds it takes, so ``grpo * sft`` or ``acc + grpo`` is a
clear error rather than a surprise. Estimators become ``EstimatorSpec`` (normalised) in
``term``, which also applies the rules that look at several components at once (rules.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from hpt_dsl.lang import ast, rules
from hpt_dsl.lang.components import KEY_MEANING, KEYS, KIND_NAME, VOCAB, Form
from hpt_dsl.lang.diagnostics import Sink, did_you_mean, one_of, suggest
from hpt_dsl.lang.settings_map import ConstOverride
from hpt_dsl.recipe import (
    STATS,
    Arith,
    BoolOp,
    Call,
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
    Stat,
    Sum,
    Term,
    Zero,
)
from hpt_dsl.settings import SECTIONS, Settings

PRELUDE = "<prelude>"
T = TypeVar("T")
SPLIT_HINT = "split it with `let` definitions"


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Scal:
    expr: Scalar


@dataclass(frozen=True)
class CondV:
    cond: Cond


@dataclass(frozen=True)
class EstV:
    """An estimator under construction: key -> (normalised value, where it was written)."""

    parts: dict[str, tuple[object, ast.Pos]]
    name: str | None
    site: ast.Pos


@dataclass(frozen=True)
class LossV:
    loss: LossExpr


class _Bad:
    """An expression that already produced an error; it stays quiet from then on."""


BAD = _Bad()
Value = Num | Scal | CondV | EstV | LossV | _Bad


@dataclass
class Binding:
    value: Value
    pos: ast.Pos
    node: ast.Expr | None = None
    """The defining expression, kept for the prelude's losses: they are evaluated again where a
    recipe uses them, so that they see the recipe's constants (``--set gamma=0.25``)."""


@dataclass
class GateUse:
    """A gate's conditions as written, for the checks that need the whole loss."""

    conds: list[tuple[Cond, ast.Expr]]
    orelse: ast.Expr
    stats: set[str] = field(default_factory=set)
    stat_pos: ast.Pos | None = None


class Checker:
    """Evaluates one file's lets and loss against a scope that starts with the prelude."""

    def __init__(
        self,
        sink: Sink,
        scope: dict[str, Binding],
        settings: Settings | None,
        const_overrides: dict[str, ConstOverride] | None = None,
        set_sink: Sink | None = None,
        vocab: dict[str, dict[str, Form]] | None = None,
        stats: tuple[str, ...] = STATS,
    ) -> None:
        self.vocab = VOCAB if vocab is None else vocab
        """The component values this recipe may use: the language's, and its plugins'."""
        self.stats = stats
        """The statistics gates may read: the built-in ones, and its plugins'."""
        self.sink = sink
        self.scope = dict(scope)
        self.prelude = dict(scope)
        self.settings = settings
        self.overrides = dict(const_overrides or {})
        self.set_at: dict[str, ast.Pos] = {}
        """Where ``--set NAME=value`` changed a prelude constant."""
        self.set_sink = set_sink
        self.pending: dict[str, ast.Pos] = {}
        self.gates: list[GateUse] = []
        self.user_lets: list[str] = []

    # ----- statements -------------------------------------------------------------------------

    def run(self, module: ast.Module) -> LossExpr | None:
        """Bind every ``let``, then evaluate the (single) loss; None if it has errors."""
        self._apply_prelude_overrides({s.name for s in module.stmts if isinstance(s, ast.Let)})
        self.define(module)
        self._unused_overrides()
        losses = [s for s in module.stmts if isinstance(s, ast.LossStmt)]
        if not losses:
            self.sink.error(
                "E006",
                "this recipe defines no loss",
                None,
                hint="add a line such as `loss = grpo` (or `loss = if acc > 0 then grpo else sft`)",
            )
            return None
        for extra in losses[1:]:
            self.sink.error(
                "E017",
                f"a second loss definition (the first is at line {losses[0].pos.line})",
                extra.pos,
                hint="a recipe has one loss; combine terms with + or a gate",
            )
        return self._guarded(lambda: self.loss(losses[0].value), losses[0].pos)

    def _guarded(self, fn: Callable[[], T], pos: ast.Pos) -> T | None:
        """Run one statement's evaluation; a tree too deep for Python becomes E004 there."""
        try:
            return fn()
        except RecursionError:
            self.sink.error("E004", "expression nested too deeply", pos, hint=SPLIT_HINT)
            return None

    def define(self, module: ast.Module) -> None:
        """Evaluate and bind the ``let`` statements, in order."""
        lets = [s for s in module.stmts if isinstance(s, ast.Let)]
        for let in lets:
            if let.name in self.pending:
                first = self.pending[let.name]
                self.sink.error(
                    "E017",
                    f"'{let.name}' is defined twice (first at line {first.line})",
                    let.name_pos,
                    hint="rename one of them",
                )
            elif let.name in self.stats:
                self.sink.error(
                    "E017",
                    f"'{let.name}' is a built-in statistic and cannot be redefined",
                    let.name_pos,
                    hint="choose another name",
                )
            else:
                self.pending[let.name] = let.name_pos
        done: set[str] = set()
        for let in lets:
            if let.name in done or let.name in self.stats:
                continue
            done.add(let.name)
            value = self._guarded(lambda let=let: self.expr(let.value), let.pos) or BAD
            value = self._override(let.name, value)
            if isinstance(value, EstV):
                value = EstV(value.parts, let.name, value.site)
                self.term(value)  # check it even if the loss never uses it
            self.scope[let.name] = Binding(value, let.name_pos, let.value)
            self.pending.pop(let.name, None)
            self.user_lets.append(let.name)

    def loss(self, node: ast.Expr) -> LossExpr | None:
        value = self.expr(node)
        result = self._as_loss(value, node, "the loss")
        if result is None:
            return None
        rules.check_gates_need_rollouts(self, result)
        return result

    def _override(self, name: str, value: Value) -> Value:
        o = self.overrides.pop(name, None)
        if o is None:
            return value
        if isinstance(value, Num):
            return Num(o.value)
        if not isinstance(value, _Bad) and self.set_sink is not None:
            self.set_sink.error(
                "E044",
                f"'{name}' is not a constant, so --set cannot change it",
                o.pos,
                hint="--set NAME=value overrides `let NAME = <number>` definitions",
            )
        return value

    def _apply_prelude_overrides(self, redefined: set[str]) -> None:
        for name in list(self.overrides):
            b = self.scope.get(name)
            if b is not None and b.pos.src == PRELUDE and name not in redefined:
                self.set_at[name] = self.overrides[name].pos
                self.scope[name] = Binding(self._override(name, b.value), b.pos)

    def _unused_overrides(self) -> None:
        if self.set_sink is None:
            return
        for name, o in self.overrides.items():
            consts = [k for k, b in self.scope.items() if isinstance(b.value, Num)]
            near = did_you_mean(name, consts)
            hint = (
                f"did you mean '{near}'?"
                if near
                else (
                    f"settings are written section.key=value (sections: {one_of(SECTIONS)}); "
                    f"constants: {one_of(consts) if consts else 'none'}"
                )
            )
            if name in self.stats:
                message, hint = f"'{name}' is a statistic measured during training, not a constant", None
            else:
                message = f"no constant named '{name}'"
            self.set_sink.error("E044", message, o.pos, hint=hint)

    # ----- expressions ------------------------------------------------------------------------

    def expr(self, node: ast.Expr) -> Value:
        method = getattr(self, "_" + type(node).__name__.lower())
        return method(node)

    def _number(self, node: ast.Number) -> Value:
        if not math.isfinite(node.value):
            self.sink.error(
                "E014",
                f"number out of range: {_short(node.text)}",
                node.pos,
                hint="numbers must be finite (at most about 1.8e308)",
            )
            return BAD
        return Num(node.value)

    def _ref(self, node: ast.Ref) -> Value:
        name = node.name
        b = self.scope.get(name)
        if b is not None:
            v = b.value
            if isinstance(v, EstV):
                # a prelude estimator is reported where it is used; a user's where it is defined
                return EstV(v.parts, v.name, node.pos) if b.pos.src == PRELUDE else v
            if isinstance(v, LossV) and b.pos.src == PRELUDE and self.settings is not None:
                return LossV(self._recheck(self._in_recipe_constants(b).loss, node.pos))
            return v
        if name in self.stats:
            return Scal(Stat(name))
        if name in self.pending:
            self.sink.error(
                "E011",
                f"'{name}' is used before its definition (line {self.pending[name].line})",
                node.pos,
                hint=f"move `let {name} = ...` above this line",
            )
            return BAD
        self.sink.error("E011", f"unknown name '{name}'", node.pos, hint=self._name_hint(name))
        return BAD

    def _in_recipe_constants(self, b: Binding) -> LossV:
        """A prelude loss evaluated again with the recipe's constants (its own `let gamma = ...`
        or ``--set gamma=...``) in place of the prelude's; the prelude's value if that fails."""
        consts = {k: v for k, v in self.scope.items() if isinstance(v.value, Num) and k in self.prelude}
        if b.node is None or all(self.prelude[k].value == v.value for k, v in consts.items()):
            return b.value  # type: ignore[return-value]
        saved = self.scope, self.sink, self.gates
        self.scope, self.sink, self.gates = {**self.prelude, **consts}, Sink(PRELUDE, ""), []
        try:
            v = self.expr(b.node)
            inner = self.gates
        finally:
            self.scope, self.sink, self.gates = saved
        name = next(k for k, c in consts.items() if self.prelude[k].value != c.value)
        at_set = name in self.set_at and self.set_sink is not None
        sink, pos = (self.set_sink, self.set_at[name]) if at_set else (self.sink, consts[name].pos)
        for use in inner:
            for cond, _ in use.conds:
                rules.check_off_grid(self, cond, pos, sink)
        return v if isinstance(v, LossV) else b.value  # type: ignore[return-value]

    def _name_hint(self, name: str) -> str:
        for key, forms in self.vocab.items():
            if name in forms:
                return f"'{name}' is a value of the component '{key}': write {key}={name}"
        if name in KEYS:
            return f"'{name}' is a component: write it as {name}=<value>"
        near = did_you_mean(name, list(self.scope) + list(self.stats))
        if near:
            return f"did you mean '{near}'?"
        estimators = [k for k, b in self.scope.items() if isinstance(b.value, EstV | LossV)]
        return f"known estimators: {one_of(estimators)}; statistics: {one_of(self.stats)}"

    def _components(self, node: ast.Components) -> Value:
        parts: dict[str, tuple[object, ast.Pos]] = {}
        name: str | None = None
        if node.base is not None:
            base = self._ref(node.base)
            if isinstance(base, _Bad):
                return BAD
            if not isinstance(base, EstV):
                kind = "a loss made of several estimators" if isinstance(base, LossV) else "not an estimator"
                self.sink.error(
                    "E019",
                    f"'{node.base.name}' is {kind}, so components cannot be added to it",
                    node.base.pos,
                    hint="components modify a single estimator, e.g. `grpo mask=clip(0.3)`",
                )
                return BAD
            parts.update(base.parts)
            name = base.name
        seen: dict[str, ast.Pos] = {}
        ok = True
        for comp in node.items:
            if comp.key in seen:
                self.sink.error(
                    "E016",
                    f"'{comp.key}' is given twice in one estimator (first at column {seen[comp.key].col})",
                    comp.key_pos,
                    hint="keep one of them",
                )
                ok = False
                continue
            seen[comp.key] = comp.key_pos
            value = self.component(comp)
            if isinstance(value, _Bad):
                ok = False
                continue
            parts[comp.key] = (value, comp.pos)
        return EstV(parts, name, node.pos) if ok else BAD

    def _unary(self, node: ast.Unary) -> Value:
        v = self.expr(node.operand)
        if node.op == "+" or isinstance(v, _Bad):
            return v
        if isinstance(v, Num):
            return Num(-v.value)
        if isinstance(v, Scal):
            return Scal(Neg(v.expr))
        if isinstance(v, EstV | LossV):
            return LossV(Scale(Const(-1.0), self._as_loss(v, node.operand, "")))  # type: ignore[arg-type]
        self._kind_error(node.operand, "a condition cannot be negated with '-'", "use `not`")
        return BAD

    def _chain(self, node: ast.Chain) -> Value:
        if node.rest[0][0] in "+-":
            return self._sum(node)
        return self._product(node)

    def _sum(self, node: ast.Chain) -> Value:
        items = [("+", node.first)] + list(node.rest)
        values = [(op, sub, self.expr(sub)) for op, sub in items]
        if any(isinstance(v, _Bad) for _, _, v in values):
            return BAD
        for _, sub, v in values:
            if isinstance(v, CondV):
                self._kind_error(
                    sub, "a condition cannot be added", "conditions go in `if ... then ... else ...`"
                )
                return BAD
        if not any(isinstance(v, EstV | LossV) for _, _, v in values):
            acc: Value = values[0][2]
            for op, _, v in values[1:]:
                acc = _arith(op, acc, v)
            return acc
        terms: list[LossExpr] = []
        for op, sub, v in values:
            if isinstance(v, Num) and v.value == 0:
                continue
            if isinstance(v, Num | Scal):
                what = "a number" if isinstance(v, Num) else "a statistic"
                self._kind_error(
                    sub,
                    f"cannot add {what} to a loss",
                    "weight a loss by multiplying it, e.g. `0.1 * sft` or `acc * grpo`",
                )
                return BAD
            loss = self._as_loss(v, sub, "")
            if loss is None:
                return BAD
            terms.append(Scale(Const(-1.0), loss) if op == "-" else loss)
        if not terms:
            return LossV(Zero())
        return LossV(terms[0] if len(terms) == 1 else Sum(tuple(terms)))

    def _product(self, node: ast.Chain) -> Value:
        items = [("*", node.first)] + list(node.rest)
        values = [(op, sub, self.expr(sub)) for op, sub in items]
        if any(isinstance(v, _Bad) for _, _, v in values):
            return BAD
        loss_at = [i for i, (_, _, v) in enumerate(values) if isinstance(v, EstV | LossV)]
        for _, sub, v in values:
            if isinstance(v, CondV):
                self._kind_error(
                    sub, "a condition cannot be multiplied", "conditions go in `if ... then ... else ...`"
                )
                return BAD
        if len(loss_at) > 1:
            self._kind_error(
                values[loss_at[1]][1],
                "cannot multiply two losses",
                "a loss can be weighted by numbers and statistics only, e.g. `acc * grpo`",
            )
            return BAD
        coef: Value = Num(1.0)
        for i, (op, sub, v) in enumerate(values):
            if i in loss_at:
                if op == "/":
                    self._kind_error(sub, "cannot divide by a loss", "divide the coefficient instead")
                    return BAD
                continue
            if op == "/" and isinstance(v, Num) and v.value == 0:
                self.sink.error("E014", "division by zero", sub.pos)  # type: ignore[union-attr]
                return BAD
            coef = v if i == 0 else _arith(op, coef, v)
        if not loss_at:
            if isinstance(coef, Num) and not math.isfinite(coef.value):
                self.sink.error("E014", "number out of range (the product overflows)", node.pos)
                return BAD
            return coef
        _, sub, v = values[loss_at[0]]
        loss = self._as_loss(v, sub, "")
        if loss is None:
            return BAD
        if isinstance(coef, Num):
            if not math.isfinite(coef.value):
                self.sink.error("E014", "number out of range (the product overflows)", node.pos)
                return BAD
            if coef.value == 1.0:
                return LossV(loss) if not isinstance(v, EstV) else v
            return LossV(Scale(Const(coef.value), loss))
        return LossV(Scale(_scalar(coef), loss))

    def _compare(self, node: ast.Compare) -> Value:
        left, right = self.expr(node.left), self.expr(node.right)
        if isinstance(left, _Bad) or isinstance(right, _Bad):
            return BAD
        for sub, v in ((node.left, left), (node.right, right)):
            if not isinstance(v, Num | Scal):
                self._kind_error(
                    sub,
                    f"only numbers and statistics can be compared, not {_kind(v)}",
                    f"compare a statistic ({one_of(self.stats)}) with a number, e.g. `acc > 0`",
                )
                return BAD
        return CondV(Compare(node.op, _scalar(left), _scalar(right)))  # type: ignore[arg-type]

    def _boolop(self, node: ast.BoolOp) -> Value:
        conds: list[Cond] = []
        for sub in node.items:
            v = self._cond(sub)
            if v is None:
                return BAD
            conds.append(v)
        return CondV(BoolOp(node.op, tuple(conds)))  # type: ignore[arg-type]

    def _not(self, node: ast.Not) -> Value:
        v = self._cond(node.operand)
        return BAD if v is None else CondV(Not(v))

    def _cond(self, node: ast.Expr) -> Cond | None:
        v = self.expr(node)
        if isinstance(v, _Bad):
            return None
        if not isinstance(v, CondV):
            self._kind_error(
                node, f"expected a condition, found {_kind(v)}", "a condition compares, e.g. `acc > 0`"
            )
            return None
        return v.cond

    def _if(self, node: ast.If) -> Value:
        conds: list[tuple[Cond, ast.Expr]] = []
        branches: list[tuple[Cond, LossExpr]] = []
        ok = True
        for cnode, bnode in node.branches:
            c = self._cond(cnode)
            b = self._as_loss(self.expr(bnode), bnode, "a gate branch")
            if c is None or b is None:
                ok = False
                continue
            conds.append((c, cnode))
            branches.append((c, b))
        orelse = self._as_loss(self.expr(node.orelse), node.orelse, "a gate branch")
        if not ok or orelse is None:
            return BAD
        use = GateUse(conds, node.orelse)
        for _, cnode in conds:
            _collect_stats(cnode, use, self.stats)
        self.gates.append(use)
        rules.check_reachable(self, use)
        return LossV(Gate(tuple(branches), orelse))

    def _apply(self, node: ast.Apply) -> Value:
        """``joint(L)`` / ``per_question(L)``: how the terms of L are normalised."""
        make = LOSS_FUNCTIONS.get(node.name)
        if make is None:
            self.sink.error(
                "E025",
                f"unknown loss function '{_short(node.name)}'",
                node.name_pos,
                hint=(suggest(node.name, list(LOSS_FUNCTIONS), "") + " ").lstrip()
                + "(joint(L): the terms of L share one normaliser; "
                "per_question(L): L per question, averaged over the questions)",
            )
            return BAD
        if len(node.args) != 1:
            self.sink.error(
                "E013", f"{node.name} takes one loss, got {len(node.args)} arguments", node.pos,
                hint=f"write {node.name}(a + b)",
            )  # fmt: skip
            return BAD
        inner = self._as_loss(self.expr(node.args[0]), node.args[0], f"the argument of {node.name}")
        if inner is None:
            return BAD
        if node.name == "joint" and _mixed_scopes(inner):
            self.sink.error(
                "E026",
                "a joint(...) normaliser cannot mix per_question terms with mini-batch terms",
                node.pos,
                hint="put the joint inside the per_question: per_question(joint(a + b))",
            )
            return BAD
        return LossV(make(inner))

    # ----- helpers ----------------------------------------------------------------------------

    def _as_loss(self, v: Value, node: ast.Expr, where: str) -> LossExpr | None:
        if isinstance(v, _Bad):
            return None
        if isinstance(v, EstV):
            return self.term(v)
        if isinstance(v, LossV):
            return v.loss
        if isinstance(v, Num) and v.value == 0:
            return Zero()
        what = f"{where} must be an estimator or a combination of estimators" if where else "expected a loss"
        if isinstance(v, Num):
            self._kind_error(
                node,
                f"{what}, found the number {_num(v.value)}",
                "a loss is an estimator (e.g. grpo) or a weighted sum of them; `0` is the empty loss",
            )
        else:
            self._kind_error(
                node,
                f"{what}, found {_kind(v)}",
                "a loss is an estimator (e.g. grpo) or a weighted sum of them",
            )
        return None

    def _kind_error(self, node: ast.Expr, message: str, hint: str) -> None:
        self.sink.error("E018", message, node.pos, hint=hint)  # type: ignore[union-attr]

    def component(self, comp: ast.Component) -> object:
        """One ``key=value``: known key, known value, right arity, arguments in range."""
        key, v = comp.key, comp.value
        if key not in self.vocab:
            self.sink.error("E010", f"unknown component '{key}'", comp.key_pos, hint=_key_hint(key))
            return BAD
        if key == "entropy":
            return self._entropy(v)
        forms = self.vocab[key]
        name = v.name
        if _is_number(name):
            if key == "denom" and float(name) == 1.0 and v.args is None:
                return "1"
            if key == "adv" and v.args is None:
                value = float(name)
                if not math.isfinite(value):
                    self.sink.error("E014", f"number out of range: {_short(name)}", v.pos)
                    return BAD
                return Call("const", (value,))
        form = forms.get(name)
        if form is None:
            kind = KIND_NAME[key]
            self.sink.error(
                "E012",
                f"unknown {kind} '{_short(name)}'",
                v.name_pos,
                hint=suggest(name, list(forms), f"{key}="),
            )
            return BAD
        args = self._args(form, v, key)
        if args is None:
            return BAD
        return _normalise(key, form, args, v.args is None)

    def _args(self, form: Form, v: ast.CValue, key: str) -> tuple[float, ...] | None:
        given = v.args or ()
        if len(given) not in form.arity or (v.args is None and 0 not in form.arity):
            self.sink.error(
                "E013",
                f"{form.name} takes {_arity_text(form)}, got {len(given)}",
                v.pos,
                hint=f"write {key}={_usage(form)}",
            )
            return None
        out: list[float] = []
        for a in given:
            x = self.expr(a)
            if isinstance(x, _Bad):
                return None
            if not isinstance(x, Num):
                self._kind_error(
                    a,
                    f"the arguments of {form.name} must be constant numbers, found {_kind(x)}",
                    "statistics vary per question; use a gate or a coefficient instead",
                )
                return None
            out.append(x.value)
        if form.check is not None:
            bad = form.check(tuple(out))
            if bad is not None:
                i, what = bad
                pname = form.params[i] if i < len(form.params) else f"argument {i + 1}"
                if form.name == "dual_clip" and i == len(out) - 1:
                    pname = "c"
                self.sink.error(
                    "E014",
                    f"{form.name}: {pname} = {_num(out[i])} is out of range: {what}",
                    given[i].pos,
                    hint=f"write {key}={_usage(form)}",
                )  # type: ignore[union-attr]
                return None
        return tuple(out)

    def _entropy(self, v: ast.CValue) -> object:
        if v.args is None and v.name == "none":
            return 0.0
        if v.args is not None or not _is_number(v.name):
            self.sink.error(
                "E012",
                f"entropy takes a coefficient, not '{_short(v.name)}'",
                v.pos,
                hint="write entropy=0.001",
            )
            return BAD
        value = float(v.name)
        if not math.isfinite(value):
            self.sink.error(
                "E014", f"number out of range: {_short(v.name)}", v.pos, hint="write entropy=0.001"
            )
            return BAD
        return value

    def term(self, est: EstV) -> Term:
        """The estimator with every component explicit, after the multi-component rules."""
        values = {k: val for k, (val, _) in est.parts.items()}
        agg = values.get("agg")
        if isinstance(agg, Call) and agg.name in ("token_sum_norm", "token_sum") and not agg.args and self.settings:
            values["agg"] = Call(agg.name, (float(self.settings.rollout.max_new_tokens),))
        w = values.get("ent_weight")
        if isinstance(w, Call) and len(w.args) == 1:
            values["ent_weight"] = Call(w.name, (w.args[0], 1.0))
        spec = EstimatorSpec(**values, name=est.name)  # type: ignore[arg-type]
        rules.check_estimator(self, est, spec)
        return Term(spec)

    def _recheck(self, loss: LossExpr, site: ast.Pos) -> LossExpr:
        """A prelude loss (checked without settings) checked again against this run's settings."""
        if isinstance(loss, Term):
            spec = loss.estimator
            parts = {k: (getattr(spec, k), site) for k in KEYS}
            return self.term(EstV(parts, spec.name, site))
        if isinstance(loss, Scale):
            return Scale(loss.coef, self._recheck(loss.loss, site))
        if isinstance(loss, Sum):
            return Sum(tuple(self._recheck(i, site) for i in loss.items))
        if isinstance(loss, Gate):
            branches = tuple((c, self._recheck(b, site)) for c, b in loss.branches)
            return Gate(branches, self._recheck(loss.orelse, site))
        if isinstance(loss, Joint | PerQuestion):
            return type(loss)(self._recheck(loss.loss, site))
        return loss

    def where(self, est: EstV, *keys: str) -> ast.Pos:
        """The best place to point at: the first of ``keys`` written in the user's file."""
        for key in keys:
            part = est.parts.get(key)
            if part is not None and part[1].src != PRELUDE:
                return part[1]
        return est.site


# ----- small helpers ----------------------------------------------------------------------------

LOSS_FUNCTIONS: dict[str, Callable[[LossExpr], LossExpr]] = {"joint": Joint, "per_question": PerQuestion}
"""The functions a loss expression may apply (``joint(a + b)``, ``per_question(L)``)."""


def _mixed_scopes(loss: LossExpr) -> bool:
    """True when some terms of ``loss`` sit under a per_question and others do not."""
    seen: set[bool] = set()
    stack: list[tuple[LossExpr, bool]] = [(loss, False)]
    while stack:
        node, pq = stack.pop()
        if isinstance(node, Term):
            seen.add(pq)
        elif isinstance(node, PerQuestion):
            stack.append((node.loss, True))
        elif isinstance(node, Joint | Scale):
            stack.append((node.loss, pq))
        elif isinstance(node, Sum):
            stack += [(i, pq) for i in node.items]
        elif isinstance(node, Gate):
            stack += [(b, pq) for _, b in node.branches] + [(node.orelse, pq)]
    return len(seen) > 1


def _normalise(key: str, form: Form, args: tuple[float, ...], bare: bool) -> object:
    if key in ("denom", "on", "group"):
        return form.name
    if key in ("kl", "ent_weight") and form.name == "none":
        return None
    if form.name in ("clip", "seq_clip") and len(args) == 1:
        args = (args[0], args[0])
    if form.name == "dual_clip" and len(args) == 2:
        args = (args[0], args[0], args[1])
    return Call(form.name, args)


def _arith(op: str, a: Value, b: Value) -> Value:
    if isinstance(a, Num) and isinstance(b, Num):
        x, y = a.value, b.value
        if op == "/":
            return Num(x / y) if y != 0 else Num(math.inf)
        return Num(x + y if op == "+" else x - y if op == "-" else x * y)
    return Scal(Arith(op, _scalar(a), _scalar(b)))  # type: ignore[arg-type]


def _scalar(v: Value) -> Scalar:
    if isinstance(v, Num):
        return Const(v.value)
    assert isinstance(v, Scal)
    return v.expr


def _collect_stats(node: ast.Expr, use: GateUse, stats: tuple[str, ...]) -> None:
    stack: list[object] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Ref) and n.name in stats:
            use.stats.add(n.name)
            if n.name != "step" and use.stat_pos is None:
                use.stat_pos = n.pos
        for child in _children(n):
            stack.append(child)


def _children(n: object) -> list[object]:
    if isinstance(n, ast.Chain):
        return [n.first] + [e for _, e in n.rest]
    if isinstance(n, ast.Compare):
        return [n.left, n.right]
    if isinstance(n, ast.BoolOp):
        return list(n.items)
    if isinstance(n, ast.Not | ast.Unary):
        return [n.operand]
    if isinstance(n, ast.Apply):
        return list(n.args)
    return []


def _kind(v: Value) -> str:
    return {
        Num: "a number",
        Scal: "a statistic",
        CondV: "a condition",
        EstV: "an estimator",
        LossV: "a loss",
    }.get(type(v), "an invalid expression")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _short(text: str) -> str:
    return text if len(text) <= 24 else text[:21] + "..."


def _arity_text(form: Form) -> str:
    """'1 argument', '1 or 2 arguments', 'no arguments or 1 argument'."""
    counts = sorted(form.arity)
    if counts[0] == 0:
        rest = " or ".join(str(n) for n in counts[1:])
        plural = "s" if counts[-1] > 1 else ""
        return "no arguments" + (f" or {rest} argument{plural}" if rest else "")
    return f"{' or '.join(str(n) for n in counts)} argument{'s' if counts[-1] > 1 else ''}"


def _usage(form: Form) -> str:
    if form.arity == (0,):
        return form.name
    examples = {
        "clip": "clip(0.2) or clip(0.2, 0.28)",
        "dual_clip": "dual_clip(0.2, 3)",
        "cispo": "cispo(0.28)",
        "seq_clip": "seq_clip(3e-4, 4e-4)",
        "const": "const(1)",
        "gae": "gae(1.0, 0.95)",
        "shaped": "shaped(0.1)",
        "token_sum_norm": "token_sum_norm or token_sum_norm(1024)",
        "k1": "k1(0.001)",
        "k2": "k2(0.001)",
        "k3": "k3(0.001)",
    }
    return examples.get(form.name, f"{form.name}({', '.join(form.params)})")


def _key_hint(key: str) -> str:
    near = did_you_mean(key, KEYS)
    if near:
        return f"did you mean '{near}' ({KEY_MEANING[near]})?"
    for section, model in SECTIONS.items():
        if key in model.model_fields:
            return f"'{key}' is a setting: write `{section} {{ {key} = ... }}` or `{section}.{key} = ...`"
    return f"components are {one_of(KEYS)}; to name a constant write `let {key} = ...`"
