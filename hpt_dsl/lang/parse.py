"""Text to syntax tree: the lark LALR parser for grammar/hpt.lark, and its errors as diagnostics.

    parse(text, src, sink) -> ast.Module | None

Three steps, each of which reports into ``sink`` instead of raising:
1. ``prescan``: brackets balanced and at most ``MAX_DEPTH`` deep (so a file of 10,000
   '(' gets one clear message, and later passes never recurse too deep);
2. lark's LALR(1) parser, newline-aware: a newline ends a statement except inside
   brackets (``_Brackets`` drops it there);
3. ``_ToAst`` turns the lark tree into the frozen nodes of ast.py, without recursion.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import lark
from lark import Token, Transformer_NonRecursive, v_args

from hpt_dsl.lang import ast
from hpt_dsl.lang.diagnostics import Sink

MAX_DEPTH = 64
"""Deepest bracket nesting accepted; deeper is reported as 'nested too deeply'."""

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


class _Brackets:
    """Post-lexer: a newline inside (), [] or {} is whitespace, not a statement end."""

    always_accept = ("_NL",)

    def process(self, stream: Any) -> Any:
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB", "LBRACE"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB", "RBRACE"):
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files("hpt_dsl.grammar").joinpath("hpt.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_Brackets(),
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse(text: str, src: str, sink: Sink) -> ast.Module | None:
    """Parse one file; on a syntax error report it into ``sink`` and return None."""
    if not prescan(text, sink):
        return None
    try:
        tree = _parser().parse(text + "\n")
    except lark.exceptions.UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else "?"
        sink.add(
            "error",
            "E001",
            f"unexpected character {ch!r}",
            e.line,
            e.column,
            e.column + 1,
            hint="names are letters, digits and '_'; numbers look like 8, 0.2 or 1e-3; "
            "comments start with '#'",
        )
        return None
    except lark.exceptions.UnexpectedInput as e:
        _unexpected_token(e, text, sink)
        return None
    try:
        return _ToAst(src).transform(tree)
    except RecursionError:
        sink.add(
            "error", "E004", "expression nested too deeply", 1, 1, hint="split it with `let` definitions"
        )
        return None


def prescan(text: str, sink: Sink) -> bool:
    """Check bracket balance and depth, skipping comments and strings."""
    stack: list[tuple[str, int, int]] = []
    line, col, i, n = 1, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch in "\"'":
            j = i + 1
            while j < n and text[j] not in (ch, "\n"):
                j += 2 if text[j] == "\\" else 1
            col += j + 1 - i
            i = j + 1
            continue
        if ch in _OPEN:
            stack.append((ch, line, col))
            if len(stack) > MAX_DEPTH:
                sink.add(
                    "error",
                    "E004",
                    f"expression nested too deeply (more than {MAX_DEPTH} levels of brackets)",
                    line,
                    col,
                    col + 1,
                    hint="split it with `let` definitions",
                )
                return False
        elif ch in _CLOSE:
            if not stack:
                sink.add(
                    "error",
                    "E003",
                    f"unmatched '{ch}'",
                    line,
                    col,
                    col + 1,
                    hint=f"remove it or add a '{_CLOSE[ch]}' before it",
                )
                return False
            opener, oline, ocol = stack.pop()
            if _OPEN[opener] != ch:
                sink.add(
                    "error",
                    "E003",
                    f"'{ch}' does not match '{opener}' opened at {oline}:{ocol}",
                    line,
                    col,
                    col + 1,
                    hint=f"close it with '{_OPEN[opener]}'",
                )
                return False
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    if stack:
        opener, oline, ocol = stack[-1]
        sink.add(
            "error",
            "E003",
            f"'{opener}' is never closed",
            oline,
            ocol,
            ocol + 1,
            hint=f"add a '{_OPEN[opener]}'",
        )
        return False
    return True


# ----- syntax errors -------------------------------------------------------------------------

_FRIENDLY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "ROWS_BOTH": "'rollouts+demos'",
    "_NL": "end of line",
    "$END": "end of file",
}


def _describe(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    for t in _parser().terminals:
        if t.name == name and t.pattern.type == "str":
            return f"'{t.pattern.value}'"
    return name.lower()


def _unexpected_token(e: lark.exceptions.UnexpectedInput, text: str, sink: Sink) -> None:
    tok = getattr(e, "token", None)
    kind = getattr(tok, "type", "$END")
    expected = sorted({_describe(x) for x in getattr(e, "expected", ()) or ()})
    if kind in ("_NL", "$END") or tok is None:
        what = "unexpected end of line" if kind == "_NL" else "unexpected end of file"
        line = getattr(tok, "line", None) or getattr(e, "line", None)
        col = getattr(tok, "column", None) or getattr(e, "column", None)
        if not isinstance(line, int) or line < 1:
            lines = text.split("\n")
            line, col = len(lines), len(lines[-1]) + 1
        if kind == "_NL":
            # point just past the last thing on that line, not at the newline itself
            lines = text.split("\n")
            if 0 < line <= len(lines):
                col = len(lines[line - 1].rstrip()) + 1
                col = _before_comment(lines[line - 1], col)
        sink.add("error", "E002", what, line, col, (col or 1) + 1, hint=_expected_hint(expected))
        return
    shown = str(tok)
    shown = shown if len(shown) <= 30 else shown[:27] + "..."
    message = f"unexpected {_describe(kind) if kind not in ('NAME', 'NUMBER', 'STRING') else repr(shown)}"
    end = tok.end_column if tok.end_line == tok.line else None
    sink.add("error", "E002", message, tok.line, tok.column, end, hint=_expected_hint(expected))


def _before_comment(line_text: str, col: int) -> int:
    m = re.search(r"\s*#", line_text)
    return m.start() + 1 if m else col


def _expected_hint(expected: list[str]) -> str | None:
    """'expected 'then', ')' or a name': keywords first, then symbols, then kinds of token."""
    if not expected:
        return None
    expected = sorted(
        expected, key=lambda x: (not x[1:2].isalpha(), x.startswith("a") or x.startswith("end"), x)
    )
    if len(expected) > 8:
        expected = expected[:8] + ["..."]
    if len(expected) == 1:
        return "expected " + expected[0]
    return "expected " + ", ".join(expected[:-1]) + " or " + expected[-1]


# ----- lark tree -> ast -----------------------------------------------------------------------


def _tok_pos(tok: Token, src: str) -> ast.Pos:
    return ast.Pos(tok.line, tok.column, tok.end_line, tok.end_column, src)


_INT = re.compile(r"\d+")


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    """One method per grammar rule (same names), each building one ast node."""

    def __init__(self, src: str) -> None:
        super().__init__()
        self.src = src

    def _pos(self, meta: Any, *parts: Any) -> ast.Pos:
        if not getattr(meta, "empty", True):
            return ast.Pos(meta.line, meta.column, meta.end_line, meta.end_column, self.src)
        for p in parts:
            if isinstance(p, Token) and p.line is not None:
                return _tok_pos(p, self.src)
            pos = getattr(p, "pos", None)
            if pos is not None:
                return pos
        return ast.Pos(1, 1, 1, 2, self.src)

    # statements
    def start(self, meta: Any, stmts: list[Any]) -> ast.Module:
        return ast.Module(tuple(stmts), self.src)

    def let_stmt(self, meta: Any, c: list[Any]) -> ast.Let:
        return ast.Let(str(c[0]), c[1], self._pos(meta, *c), _tok_pos(c[0], self.src))

    def use_stmt(self, meta: Any, c: list[Any]) -> ast.Use:
        return ast.Use(_unescape(str(c[0])[1:-1]), self._pos(meta, *c))

    def loss_stmt(self, meta: Any, c: list[Any]) -> ast.LossStmt:
        return ast.LossStmt(c[0], self._pos(meta, *c))

    def expr_stmt(self, meta: Any, c: list[Any]) -> ast.LossStmt:
        return ast.LossStmt(c[0], self._pos(meta, *c), bare=True)

    def setting(self, meta: Any, c: list[Any]) -> ast.Setting:
        sec, key, value = c
        return ast.Setting(
            str(sec), str(key), value, self._pos(meta, *c), _tok_pos(sec, self.src), _tok_pos(key, self.src)
        )

    def item(self, meta: Any, c: list[Any]) -> tuple[Token, ast.SettingValue, ast.Pos]:
        return (c[0], c[1], self._pos(meta, *c))

    def block(self, meta: Any, c: list[Any]) -> ast.Block:
        sec = c[0]
        sec_pos = _tok_pos(sec, self.src)
        items = tuple(
            ast.Setting(str(sec), str(key), value, pos, sec_pos, _tok_pos(key, self.src))
            for key, value, pos in c[1:]
        )
        return ast.Block(str(sec), items, self._pos(meta, *c), sec_pos)

    # settings values
    def v_number(self, meta: Any, c: list[Any]) -> ast.SettingValue:
        text = str(c[0])
        pos = _tok_pos(c[0], self.src)
        if _INT.fullmatch(text):
            return ast.SettingValue("int", int(text) if len(text) <= 400 else float("inf"), pos)
        return ast.SettingValue("float", float(text), pos)

    def v_negative(self, meta: Any, c: list[Any]) -> ast.SettingValue:
        v = self.v_number(meta, c)
        value = -v.value if isinstance(v.value, int | float) else v.value
        return ast.SettingValue(v.kind, value, self._pos(meta, *c))

    def v_string(self, meta: Any, c: list[Any]) -> ast.SettingValue:
        return ast.SettingValue("string", _unescape(str(c[0])[1:-1]), _tok_pos(c[0], self.src))

    def v_word(self, meta: Any, c: list[Any]) -> ast.SettingValue:
        return ast.SettingValue("word", str(c[0]), _tok_pos(c[0], self.src))

    def v_tuple(self, meta: Any, c: list[Any]) -> ast.SettingValue:
        return ast.SettingValue("tuple", tuple(c), self._pos(meta, *c))

    # expressions
    def ifexpr(self, meta: Any, c: list[Any]) -> ast.If:
        branches = [(c[0], c[1])] + [b for b in c[2:-1]]
        return ast.If(tuple(branches), c[-1], self._pos(meta, *c))

    def elif_(self, meta: Any, c: list[Any]) -> tuple[ast.Expr, ast.Expr]:
        return (c[0], c[1])

    def disj(self, meta: Any, c: list[Any]) -> ast.BoolOp:
        return ast.BoolOp("or", tuple(c), self._pos(meta, *c))

    def conj(self, meta: Any, c: list[Any]) -> ast.BoolOp:
        return ast.BoolOp("and", tuple(c), self._pos(meta, *c))

    def not_(self, meta: Any, c: list[Any]) -> ast.Not:
        return ast.Not(c[0], self._pos(meta, *c))

    def compare(self, meta: Any, c: list[Any]) -> ast.Compare:
        return ast.Compare(c[1], c[0], c[2], self._pos(meta, *c))

    def _chain(self, meta: Any, c: list[Any]) -> ast.Chain:
        rest = tuple((c[i], c[i + 1]) for i in range(1, len(c) - 1, 2))
        return ast.Chain(c[0], rest, self._pos(meta, *c))

    sum = _chain
    product = _chain

    def compop(self, meta: Any, c: list[Any]) -> str:
        return str(c[0])

    addop = compop
    mulop = compop

    def neg(self, meta: Any, c: list[Any]) -> ast.Unary:
        return ast.Unary("-", c[0], self._pos(meta, *c))

    def pos(self, meta: Any, c: list[Any]) -> ast.Unary:
        return ast.Unary("+", c[0], self._pos(meta, *c))

    def number(self, meta: Any, c: list[Any]) -> ast.Number:
        return ast.Number(float(c[0]), str(c[0]), _tok_pos(c[0], self.src))

    def ref(self, meta: Any, c: list[Any]) -> ast.Ref:
        return ast.Ref(str(c[0]), _tok_pos(c[0], self.src))

    def call(self, meta: Any, c: list[Any]) -> ast.Apply:
        return ast.Apply(str(c[0]), tuple(c[1:]), self._pos(meta, *c), _tok_pos(c[0], self.src))

    def derive(self, meta: Any, c: list[Any]) -> ast.Components:
        base = ast.Ref(str(c[0]), _tok_pos(c[0], self.src))
        return ast.Components(base, tuple(c[1:]), self._pos(meta, *c))

    def components(self, meta: Any, c: list[Any]) -> ast.Components:
        return ast.Components(None, tuple(c), self._pos(meta, *c))

    def component(self, meta: Any, c: list[Any]) -> ast.Component:
        return ast.Component(str(c[0]), c[1], self._pos(meta, *c), _tok_pos(c[0], self.src))

    def c_word(self, meta: Any, c: list[Any]) -> ast.CValue:
        p = _tok_pos(c[0], self.src)
        name = "rollouts+demos" if c[0].type == "ROWS_BOTH" else str(c[0])
        return ast.CValue(name, None, p, p)

    def c_call(self, meta: Any, c: list[Any]) -> ast.CValue:
        return ast.CValue(str(c[0]), tuple(c[1:]), self._pos(meta, *c), _tok_pos(c[0], self.src))

    def c_number(self, meta: Any, c: list[Any]) -> ast.CValue:
        p = _tok_pos(c[0], self.src)
        return ast.CValue(str(c[0]), None, p, p)

    def c_negative(self, meta: Any, c: list[Any]) -> ast.CValue:
        p = self._pos(meta, *c)
        return ast.CValue("-" + str(c[0]), None, p, p)


# lark names the rule 'elif', a Python keyword; map it to the method above.
setattr(_ToAst, "elif", _ToAst.elif_)
