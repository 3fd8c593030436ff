"""Which gate branches can ever be taken: interval evaluation of conditions.

A gate ``if c1 then l1 elif c2 then l2 else l3`` is decided per question from its
statistics. For every possible number of solved rollouts k = 0..n we know acc = k/n and
solved = k exactly; the other statistics are bounded (reward_mean, reward_std in [0, 1],
step in [0, steps-1]). Each condition evaluates to the set of truth values it can take;
a branch is reachable when, for some k, all earlier conditions can be false and its own
can be true. The analysis over-approximates, so it warns only about branches that are
certainly dead.
"""

from __future__ import annotations

import math

from hpt_dsl.recipe import Arith, BoolOp, Compare, Cond, Const, Neg, Not, Scalar, Stat

Interval = tuple[float, float]
MAX_ENUMERATED_N = 1024


def environments(n: int, steps: int) -> list[dict[str, Interval]]:
    """One environment per possible solved count (intervals for the other statistics)."""
    base: dict[str, Interval] = {
        "n": (n, n),
        "reward_mean": (0.0, 1.0),
        "reward_std": (0.0, 1.0),
        "step": (0.0, float(max(steps - 1, 0))),
    }
    if n > MAX_ENUMERATED_N:
        return [{**base, "acc": (0.0, 1.0), "solved": (0.0, float(n))}]
    return [{**base, "acc": (k / n, k / n), "solved": (float(k), float(k))} for k in range(n + 1)]


def interval(x: Scalar, env: dict[str, Interval]) -> Interval:
    if isinstance(x, Const):
        return (x.value, x.value)
    if isinstance(x, Stat):
        return env.get(x.name, (-math.inf, math.inf))
    if isinstance(x, Neg):
        lo, hi = interval(x.operand, env)
        return (-hi, -lo)
    if isinstance(x, Arith):
        a, b = interval(x.left, env), interval(x.right, env)
        if x.op == "+":
            return (a[0] + b[0], a[1] + b[1])
        if x.op == "-":
            return (a[0] - b[1], a[1] - b[0])
        if x.op == "*":
            return _span([_mul(p, q) for p in a for q in b])
        if b[0] <= 0 <= b[1]:
            return (-math.inf, math.inf)
        return _span([p / q for p in a for q in b])
    return (-math.inf, math.inf)


def _mul(p: float, q: float) -> float:
    return 0.0 if p == 0 or q == 0 else p * q


def _span(values: list[float]) -> Interval:
    clean = [v for v in values if not math.isnan(v)]
    if len(clean) < len(values):
        return (-math.inf, math.inf)
    return (min(clean), max(clean))


def outcomes(c: Cond, env: dict[str, Interval]) -> set[bool]:
    """The truth values ``c`` can take in ``env`` (a superset of the true set)."""
    if isinstance(c, Compare):
        (alo, ahi), (blo, bhi) = interval(c.left, env), interval(c.right, env)
        op = c.op
        if op in (">", ">="):
            (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), "<" if op == ">" else "<="
        if op == "<":
            can_true, can_false = alo < bhi, ahi >= blo
        elif op == "<=":
            can_true, can_false = alo <= bhi, ahi > blo
        else:
            overlap = alo <= bhi and blo <= ahi
            same_point = alo == ahi == blo == bhi
            can_true, can_false = (overlap, not same_point) if op == "==" else (not same_point, overlap)
        return {v for v, ok in ((True, can_true), (False, can_false)) if ok}
    if isinstance(c, Not):
        return {not v for v in outcomes(c.operand, env)}
    if isinstance(c, BoolOp):
        parts = [outcomes(i, env) for i in c.items]
        if c.op == "and":
            can_true = all(True in p for p in parts)
            can_false = any(False in p for p in parts)
        else:
            can_true = any(True in p for p in parts)
            can_false = all(False in p for p in parts)
        return {v for v, ok in ((True, can_true), (False, can_false)) if ok}
    return {True, False}


def off_grid(c: Cond, n: int) -> list[tuple[Compare, float]]:
    """Comparisons of ``acc`` with a constant between two of its values k/n: ``acc > c``
    holds for the same k as ``acc > floor(c·n)/n`` (``>=``, ``<``: ``ceil(c·n)/n``), so the
    constant acts only through the grid point below or above it. [(comparison, that point)]."""
    if isinstance(c, Not):
        return off_grid(c.operand, n)
    if isinstance(c, BoolOp):
        return [hit for i in c.items for hit in off_grid(i, n)]
    if not isinstance(c, Compare) or n < 1 or n > MAX_ENUMERATED_N or c.op in ("==", "!="):
        return []
    if isinstance(c.left, Stat) and c.left.name == "acc" and isinstance(c.right, Const):
        value, up = c.right.value, c.op in (">=", "<")
    elif isinstance(c.right, Stat) and c.right.name == "acc" and isinstance(c.left, Const):
        value, up = c.left.value, c.op in ("<=", ">")
    else:
        return []
    scaled = value * n
    if not 0 < value < 1 or math.isclose(scaled, round(scaled), abs_tol=1e-9):
        return []
    return [(c, (math.ceil(scaled) if up else math.floor(scaled)) / n)]


def dead_branches(conds: list[Cond], n: int, steps: int) -> tuple[list[tuple[int, str]], bool]:
    """([(branch index, why)], else_dead) for a gate's conditions."""
    envs = environments(n, steps)
    table = [[outcomes(c, env) for c in conds] for env in envs]
    dead: list[tuple[int, str]] = []
    for i in range(len(conds)):
        if not any(True in row[i] for row in table):
            dead.append((i, "its condition is never true"))
        elif not any(True in row[i] and all(False in row[j] for j in range(i)) for row in table):
            dead.append((i, "the conditions before it already cover every case where it is true"))
    else_dead = not any(all(False in o for o in row) for row in table)
    return dead, else_dead
