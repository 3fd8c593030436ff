"""Every rule of grammar/hpt.lark parses to the intended syntax tree, and every kind of
syntax error is reported with its place."""

from __future__ import annotations

import pytest

from hpt_dsl.lang import ast
from hpt_dsl.lang.diagnostics import Diagnostic, Sink
from hpt_dsl.lang.parse import MAX_DEPTH, parse


def tree(text: str) -> ast.Module:
    sink = Sink("t.hpt", text)
    module = parse(text, "t.hpt", sink)
    assert module is not None, [d.render() for d in sink.items]
    assert sink.items == []
    return module


def first(text: str) -> ast.Stmt:
    return tree(text).stmts[0]


def loss_of(text: str) -> ast.Expr:
    stmt = first(text)
    assert isinstance(stmt, ast.LossStmt)
    return stmt.value


def syntax_error(text: str) -> Diagnostic:
    sink = Sink("t.hpt", text)
    assert parse(text, "t.hpt", sink) is None
    assert len(sink.items) == 1, [d.render() for d in sink.items]
    return sink.items[0]


# ----- statements ----------------------------------------------------------------------------


def test_comments_blank_lines_and_statement_order() -> None:
    m = tree("# a comment\n\n  # indented comment\nlet x = 1   # trailing\n\nloss = grpo\n\n")
    assert [type(s).__name__ for s in m.stmts] == ["Let", "LossStmt"]


def test_let_binds_a_name_with_its_position() -> None:
    s = first("let gamma = 0")
    assert isinstance(s, ast.Let) and s.name == "gamma"
    assert (s.name_pos.line, s.name_pos.col, s.name_pos.end_col) == (1, 5, 10)
    assert isinstance(s.value, ast.Number) and s.value.value == 0


def test_loss_statement_and_bare_expression_statement() -> None:
    s = first("loss = grpo")
    assert isinstance(s, ast.LossStmt) and not s.bare
    bare = first("mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik")
    assert isinstance(bare, ast.LossStmt) and bare.bare
    assert isinstance(bare.value, ast.Components) and bare.value.base is None
    assert [c.key for c in bare.value.items] == ["mask", "denom", "adv", "grad"]


def test_dotted_setting() -> None:
    s = first("train.steps = 100")
    assert isinstance(s, ast.Setting)
    assert (s.section, s.key, s.value.kind, s.value.value) == ("train", "steps", "int", 100)
    assert (s.key_pos.line, s.key_pos.col) == (1, 7)


def test_block_on_one_line_and_over_several_lines_with_commas() -> None:
    one = first("rollout { n = 8  temperature = 1.0 }")
    assert isinstance(one, ast.Block)
    assert [(i.key, i.value.value) for i in one.items] == [("n", 8), ("temperature", 1.0)]
    many = first("rollout {\n  n = 8,\n  temperature = 0.7\n}\n")
    assert isinstance(many, ast.Block)
    assert [(i.key, i.value.value, i.key_pos.line) for i in many.items] == [
        ("n", 8, 2),
        ("temperature", 0.7, 3),
    ]
    empty = first("critic { }")
    assert isinstance(empty, ast.Block) and empty.items == ()


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("8", "int", 8),
        ("0.25", "float", 0.25),
        ("1e-3", "float", 1e-3),
        ("-2", "int", -2),
        ("-0.5", "float", -0.5),
        ('"smollm2-135m"', "string", "smollm2-135m"),
        ("'a \\'quoted\\' word'", "string", "a 'quoted' word"),
        ('"tab\\there"', "string", "tab\there"),
        ("vllm", "word", "vllm"),
        ("true", "word", "true"),
    ],
)
def test_settings_values(text: str, kind: str, value: object) -> None:
    s = first(f"x.y = {text}")
    assert isinstance(s, ast.Setting)
    assert (s.value.kind, s.value.value) == (kind, value)


def test_settings_tuples_in_parentheses_and_brackets() -> None:
    for text in ("(0.9, 0.95)", "[0.9, 0.95]", "(0.9, 0.95,)"):
        s = first(f"train.betas = {text}")
        assert isinstance(s, ast.Setting) and s.value.kind == "tuple"
        assert [v.value for v in s.value.value] == [0.9, 0.95]  # type: ignore[attr-defined]


# ----- expressions -----------------------------------------------------------------------------


def test_if_elif_else() -> None:
    e = loss_of("loss = if acc > 0.5 then grpo elif step < 10 then sft else 0")
    assert isinstance(e, ast.If)
    assert len(e.branches) == 2
    assert isinstance(e.branches[1][0], ast.Compare) and e.branches[1][0].op == "<"
    assert isinstance(e.orelse, ast.Number)


def test_else_branch_extends_to_the_end_of_the_line() -> None:
    e = loss_of("loss = if acc > 0 then grpo else 0.1 * sft + luffy_off")
    assert isinstance(e, ast.If)
    assert isinstance(e.orelse, ast.Chain) and e.orelse.rest[0][0] == "+"


def test_boolean_operators_precedence() -> None:
    e = loss_of("loss = if not acc > 0 and step >= 3 or solved == 1 then grpo else sft")
    assert isinstance(e, ast.If)
    cond = e.branches[0][0]
    assert isinstance(cond, ast.BoolOp) and cond.op == "or"
    left = cond.items[0]
    assert isinstance(left, ast.BoolOp) and left.op == "and"
    assert isinstance(left.items[0], ast.Not)


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_operator(op: str) -> None:
    e = loss_of(f"loss = if acc {op} 0.5 then grpo else sft")
    assert isinstance(e, ast.If)
    assert e.branches[0][0].op == op  # type: ignore[union-attr]


def test_arithmetic_precedence_and_flat_chains() -> None:
    e = loss_of("loss = acc * grpo + (1 - acc) * sft - 2 / 4 * dapo")
    assert isinstance(e, ast.Chain)
    assert [op for op, _ in e.rest] == ["+", "-"]
    assert isinstance(e.first, ast.Chain) and e.first.rest[0][0] == "*"
    paren = e.rest[0][1]
    assert isinstance(paren, ast.Chain) and isinstance(paren.first, ast.Chain)
    assert paren.first.rest[0][0] == "-"


def test_unary_minus_and_plus() -> None:
    e = loss_of("loss = -grpo + +sft")
    assert isinstance(e, ast.Chain)
    assert isinstance(e.first, ast.Unary) and e.first.op == "-"
    assert isinstance(e.rest[0][1], ast.Unary) and e.rest[0][1].op == "+"


def test_derived_estimator_and_regularizers() -> None:
    e = loss_of("loss = grpo kl=k3(0.001) entropy=0.001")
    assert isinstance(e, ast.Components)
    assert e.base is not None and e.base.name == "grpo"
    kl, ent = e.items
    assert (kl.key, kl.value.name, len(kl.value.args or ())) == ("kl", "k3", 1)
    assert (ent.key, ent.value.name, ent.value.args) == ("entropy", "0.001", None)


@pytest.mark.parametrize(
    ("value", "name", "nargs"),
    [
        ("pi_old", "pi_old", None),
        ("clip(0.2, 0.28)", "clip", 2),
        ("clip(0.2)", "clip", 1),
        ("1", "1", None),
        ("-1", "-1", None),
        ("rollouts+demos", "rollouts+demos", None),
        ("rollouts + demos", "rollouts+demos", None),
        ("demos+rollouts", "rollouts+demos", None),
    ],
)
def test_component_values(value: str, name: str, nargs: int | None) -> None:
    e = loss_of(f"loss = grpo on={value}")
    assert isinstance(e, ast.Components)
    v = e.items[0].value
    assert v.name == name
    assert (None if v.args is None else len(v.args)) == nargs


def test_the_users_line_parses_as_written() -> None:
    e = loss_of("mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik")
    assert isinstance(e, ast.Components)
    assert [(c.key, c.value.name) for c in e.items] == [
        ("mask", "clip"),
        ("denom", "pi_old"),
        ("adv", "group_norm"),
        ("grad", "loglik"),
    ]
    assert (e.items[2].value.pos.col, e.items[2].value.pos.end_col) == (33, 43)


def test_newlines_inside_brackets_continue_the_statement() -> None:
    m = tree("let x = (mask=clip(0.2)\n         denom=pi_old)\nloss = x")
    assert [type(s).__name__ for s in m.stmts] == ["Let", "LossStmt"]


def test_tabs_and_windows_line_endings() -> None:
    m = tree("loss = grpo\r\n\trollout.n = 4\r\n")
    assert len(m.stmts) == 2


# ----- syntax errors ---------------------------------------------------------------------------


def test_unexpected_character_points_at_it() -> None:
    d = syntax_error("loss = grpo $")
    assert (d.code, d.line, d.col) == ("E001", 1, 13)
    assert "'$'" in d.message


def test_unexpected_token_lists_what_was_expected() -> None:
    d = syntax_error("loss = if acc > 0 grpo else sft")
    assert (d.code, d.line, d.col, d.end_col) == ("E002", 1, 19, 23)
    assert d.message == "unexpected 'grpo'"
    assert d.hint is not None and "'then'" in d.hint


def test_truncated_line_points_past_its_last_token() -> None:
    d = syntax_error("loss = grpo +   # comment\n")
    assert (d.code, d.message, d.line, d.col) == ("E002", "unexpected end of line", 1, 14)


def test_missing_settings_value() -> None:
    d = syntax_error("rollout { n = }")
    assert (d.code, d.line, d.col) == ("E002", 1, 15)
    assert d.hint is not None and "a number" in d.hint


def test_unclosed_bracket_points_at_the_opening_one() -> None:
    d = syntax_error("let x = 1\nloss = (grpo + sft\n")
    assert (d.code, d.line, d.col, d.message) == ("E003", 2, 8, "'(' is never closed")


def test_unmatched_and_mismatched_brackets() -> None:
    d = syntax_error("loss = grpo)")
    assert (d.code, d.col, d.message) == ("E003", 12, "unmatched ')'")
    d = syntax_error("rollout { n = (8 }")
    assert d.code == "E003" and d.message == "'}' does not match '(' opened at 1:15"


def test_brackets_in_comments_and_strings_do_not_count() -> None:
    tree('# (((\nmodel.name = "a(b"\nloss = grpo')


def test_ten_thousand_parentheses_are_nested_too_deeply() -> None:
    d = syntax_error("loss = " + "(" * 10_000 + "grpo" + ")" * 10_000)
    assert d.code == "E004" and "nested too deeply" in d.message
    assert d.col == 8 + MAX_DEPTH


def test_rendering_has_source_line_caret_and_help() -> None:
    d = syntax_error("loss = grpo $")
    assert d.render().splitlines() == [
        "t.hpt:1:13: error[E001]: unexpected character '$'",
        "  |",
        "1 | loss = grpo $",
        "  |             ^",
        "  = help: names are letters, digits and '_'; numbers look like 8, 0.2 or 1e-3; "
        "comments start with '#'",
    ]
