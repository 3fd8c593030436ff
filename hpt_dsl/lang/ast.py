"""The syntax tree of a .hpt file: typed, immutable, every node with its source position.

The parser (parse.py) builds these from the lark tree; the checker (check.py) reads them
and produces the checked ``hpt_dsl.recipe.Recipe``. Names mirror the grammar rules in
grammar/hpt.lark, so the two are read side by side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """Where a node starts and ends (1-based lines and columns; end_col exclusive).
    ``src`` names the text it came from: the recipe's path, or '<prelude>'."""

    line: int
    col: int
    end_line: int
    end_col: int
    src: str = ""


# ----- expressions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: float
    text: str
    pos: Pos


@dataclass(frozen=True)
class Ref:
    """A name: a let-bound estimator, loss or constant, or a statistic (acc, step, ...)."""

    name: str
    pos: Pos


@dataclass(frozen=True)
class CValue:
    """The value of a component: ``pi_old``, ``clip(0.2, 0.28)``, ``1``, ``rollouts+demos``.
    ``args`` is None when written without parentheses."""

    name: str
    args: tuple[Expr, ...] | None
    pos: Pos
    name_pos: Pos


@dataclass(frozen=True)
class Component:
    """``key=value``"""

    key: str
    value: CValue
    pos: Pos
    key_pos: Pos


@dataclass(frozen=True)
class Components:
    """An estimator written as components, optionally on top of a named one:
    ``grpo mask=clip(0.2, 0.28)`` has base ``grpo``."""

    base: Ref | None
    items: tuple[Component, ...]
    pos: Pos


@dataclass(frozen=True)
class Unary:
    op: str  # '-' or '+'
    operand: Expr
    pos: Pos


@dataclass(frozen=True)
class Chain:
    """``a + b - c`` or ``a * b / c``: the first operand and (op, operand) pairs, kept flat
    so that long sums never make a deep tree."""

    first: Expr
    rest: tuple[tuple[str, Expr], ...]
    pos: Pos


@dataclass(frozen=True)
class Compare:
    op: str
    left: Expr
    right: Expr
    pos: Pos


@dataclass(frozen=True)
class BoolOp:
    op: str  # 'and' | 'or'
    items: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True)
class Not:
    operand: Expr
    pos: Pos


@dataclass(frozen=True)
class If:
    """``if c1 then e1 elif c2 then e2 else e3``"""

    branches: tuple[tuple[Expr, Expr], ...]
    orelse: Expr
    pos: Pos


@dataclass(frozen=True)
class Apply:
    """``joint(a + b)``, ``per_question(L)``: a loss function applied to its arguments."""

    name: str
    args: tuple[Expr, ...]
    pos: Pos
    name_pos: Pos


Expr = Number | Ref | Components | Unary | Chain | Compare | BoolOp | Not | If | Apply


# ----- settings values ---------------------------------------------------------------------


@dataclass(frozen=True)
class SettingValue:
    """A settings value: number, string, bare word (true/false/none or a word), or tuple.
    ``kind`` is 'int', 'float', 'string', 'word' or 'tuple'."""

    kind: str
    value: object
    pos: Pos


# ----- statements --------------------------------------------------------------------------


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    pos: Pos
    name_pos: Pos


@dataclass(frozen=True)
class Use:
    """``use "my_components.py"``: a plugin whose components the recipe may use."""

    target: str
    pos: Pos


@dataclass(frozen=True)
class LossStmt:
    """``loss = expr``, or (``bare`` = True) a line that is only an expression."""

    value: Expr
    pos: Pos
    bare: bool = False


@dataclass(frozen=True)
class Setting:
    """``section.key = value``; a block ``section { k = v ... }`` yields one per item."""

    section: str
    key: str
    value: SettingValue
    pos: Pos
    section_pos: Pos
    key_pos: Pos


@dataclass(frozen=True)
class Block:
    """``section { ... }`` (kept so that an empty ``critic { }`` still enables its section)."""

    section: str
    items: tuple[Setting, ...]
    pos: Pos
    section_pos: Pos


Stmt = Let | Use | LossStmt | Setting | Block


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    stmts: tuple[Stmt, ...]
    src: str
