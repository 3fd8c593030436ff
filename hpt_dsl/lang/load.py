"""Reading a recipe end to end: file -> text -> syntax tree -> settings -> checked Recipe.

    load_recipe(source, overrides=(), text=None) -> Recipe        (raises RecipeError)
    check(path_or_text, overrides=())           -> list[Diagnostic] (never raises)

``source`` is a path (a ``PathLike``, or a one-line string that ends in ``.hpt`` or names
an existing file) or the recipe text itself (any other string), so that
``load_recipe("mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik")`` works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources

from hpt_dsl.lang import knobs, plugins, rules, settings_map
from hpt_dsl.lang.check import PRELUDE, Binding, Checker, EstV, LossV
from hpt_dsl.lang.diagnostics import Diagnostic, RecipeError, Sink
from hpt_dsl.lang.parse import parse
from hpt_dsl.recipe import EstimatorSpec, Gate, Joint, LossExpr, PerQuestion, Recipe, Scale, Sum, Term
from hpt_dsl.settings import Settings


@dataclass(frozen=True)
class Outcome:
    """Everything one check found. ``usage`` is True when the problem is the invocation
    (a missing file, a bad ``--set``) rather than the recipe text."""

    recipe: Recipe | None
    diagnostics: list[Diagnostic]
    usage: bool = False

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


def load_recipe(
    source: str | os.PathLike[str] | None = None, *, overrides: Sequence[str] = (), text: str | None = None
) -> Recipe:
    """The checked recipe; raises ``RecipeError`` (with ``.diagnostics``) if it has errors.
    Warnings are on ``recipe.warnings``."""
    out = analyse(source, overrides=overrides, text=text)
    if out.recipe is None:
        raise RecipeError(out.diagnostics)
    return out.recipe


def check(path_or_text: str | os.PathLike[str], overrides: Sequence[str] = ()) -> list[Diagnostic]:
    """Every error and warning of a recipe (empty when it is clean)."""
    return analyse(path_or_text, overrides=overrides).diagnostics


def analyse(
    source: str | os.PathLike[str] | None = None, *, overrides: Sequence[str] = (), text: str | None = None
) -> Outcome:
    label, body, problem = read_source(source, text)
    if problem is not None:
        return Outcome(None, [problem], usage=problem.code == "E007")
    assert body is not None
    sink = Sink(label, body)
    set_sink = Sink(settings_map.OVERRIDE_FILE, "\n".join(overrides))
    recipe = _check_text(body, label, list(overrides), sink, set_sink)
    diagnostics = set_sink.items + sorted(sink.items, key=lambda d: (d.line or 0, d.col or 0))
    if any(d.is_error for d in diagnostics):
        return Outcome(None, diagnostics, usage=set_sink.has_errors)
    return Outcome(recipe, diagnostics)


def _check_text(text: str, label: str, overrides: list[str], sink: Sink, set_sink: Sink) -> Recipe | None:
    module = parse(text, label, sink)
    if module is None:
        return None
    entries, opened = settings_map.collect(module, sink)
    set_entries, consts = settings_map.parse_overrides(overrides, set_sink)
    settings = settings_map.build(entries, opened, set_entries)
    found = plugins.load(module, label, sink)
    if found is None:
        return None
    vocab, stats = plugins.vocabulary(found)
    if settings is not None:
        settings = plugins.with_rewards(settings, found)
    ck = Checker(sink, prelude_scope(), settings, {c.name: c for c in consts}, set_sink, vocab, stats)
    try:
        loss = ck.run(module)
        if loss is None or sink.has_errors or set_sink.has_errors or settings is None:
            return None
        loss, estimators = name_estimators(loss)
        needs = rules.needs(loss, found)
        rules.check_recipe(ck, needs, {(e.section, e.key): e.key_pos for e in entries})
        knobs.check(settings, needs, module, entries + set_entries, sink)
    except RecursionError:
        sink.error("E004", "expression nested too deeply", None, hint="split it with `let` definitions")
        return None
    if sink.has_errors:
        return None
    warnings = tuple(set_sink.items + sink.items)
    return Recipe(loss, estimators, settings, needs, source=text, path=label, warnings=warnings, plugins=found)


# ----- reading ----------------------------------------------------------------------------------


def read_source(
    source: str | os.PathLike[str] | None, text: str | None
) -> tuple[str, str | None, Diagnostic | None]:
    """(label, text, problem): the text of a path or of an in-memory recipe."""
    if text is not None or source is None:
        label = os.fspath(source) if source else "<recipe>"
        return label, _clean(text or ""), _text_problem(text or "", label)
    if isinstance(source, str) and not _looks_like_path(source):
        return "<recipe>", _clean(source), _text_problem(source, "<recipe>")
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return (
            path,
            None,
            Diagnostic(
                "error",
                "E007",
                f"no such recipe file: {path}",
                path,
                hint="check the path; the stock recipes are in recipes/",
            ),
        )
    except OSError as e:
        return path, None, Diagnostic("error", "E007", f"cannot read {path}: {e.strerror or e}", path)
    return decode(raw, path)


def decode(raw: bytes, label: str) -> tuple[str, str | None, Diagnostic | None]:
    """UTF-8 text (a leading byte-order mark is dropped), or a diagnostic saying where it is not."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        return (
            label,
            None,
            Diagnostic(
                "error",
                "E005",
                "this is a binary file, not a recipe (it contains NUL bytes)",
                label,
                line,
                hint="a recipe is UTF-8 text",
            ),
        )
    try:
        return label, _clean(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        return (
            label,
            None,
            Diagnostic(
                "error",
                "E005",
                f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} cannot be decoded)",
                label,
                line,
                col,
                hint="save the recipe as UTF-8",
            ),
        )


def _clean(text: str) -> str:
    """Drop a byte-order mark; every line ending becomes '\n'."""
    text = text[1:] if text.startswith("\ufeff") else text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_problem(text: str, label: str) -> Diagnostic | None:
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        return Diagnostic(
            "error",
            "E005",
            "the text contains NUL characters; it is not a recipe",
            label,
            line,
            hint="a recipe is UTF-8 text",
        )
    return None


def _looks_like_path(s: str) -> bool:
    if not s or "\n" in s or len(s) > 4096:
        return False
    if s.endswith(".hpt"):
        return True
    try:
        return os.path.isfile(s)
    except (OSError, ValueError):
        return False


# ----- the prelude ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def prelude_scope() -> dict[str, Binding]:
    """The stock estimators (prelude.hpt), evaluated once."""
    text = prelude_text()
    sink = Sink(PRELUDE, text)
    module = parse(text, PRELUDE, sink)
    ck = Checker(sink, {}, None)
    if module is not None:
        ck.define(module)
    if sink.items:
        raise RuntimeError("the prelude has errors:\n" + "\n".join(d.render() for d in sink.items))
    return ck.scope


@lru_cache(maxsize=1)
def prelude_text() -> str:
    return resources.files("hpt_dsl.lang").joinpath("prelude.hpt").read_text(encoding="utf-8")


def prelude_estimators(settings: Settings | None = None) -> dict[str, LossExpr]:
    """Each prelude name bound to an estimator or a loss, as checked loss trees."""
    length = (settings or Settings()).rollout.max_new_tokens
    return dict(_prelude_terms(length))


@lru_cache(maxsize=8)
def _prelude_terms(max_new_tokens: int) -> tuple[tuple[str, LossExpr], ...]:
    settings = Settings()
    settings.rollout.max_new_tokens = max_new_tokens
    ck = Checker(Sink(PRELUDE, prelude_text()), prelude_scope(), settings)
    out: list[tuple[str, LossExpr]] = []
    for name, b in prelude_scope().items():
        if isinstance(b.value, EstV):
            out.append((name, ck.term(b.value)))
        elif isinstance(b.value, LossV):
            out.append((name, b.value.loss))
    return tuple(out)


# ----- naming -----------------------------------------------------------------------------------


def name_estimators(loss: LossExpr) -> tuple[LossExpr, dict[str, EstimatorSpec]]:
    """Give every estimator of the loss a unique name (its let name, else 'estimator');
    equal estimators share one name, different ones with the same name get _2, _3, ..."""
    table: dict[str, EstimatorSpec] = {}

    def visit(node: LossExpr) -> LossExpr:
        if isinstance(node, Term):
            spec = node.estimator
            base = spec.name or "estimator"
            key, k = base, 1
            while key in table and table[key] != spec:
                k += 1
                key = f"{base}_{k}"
            named = replace(spec, name=key)
            table.setdefault(key, named)
            return Term(named)
        if isinstance(node, Scale):
            return Scale(node.coef, visit(node.loss))
        if isinstance(node, Sum):
            return Sum(tuple(visit(i) for i in node.items))
        if isinstance(node, Gate):
            return Gate(tuple((c, visit(b)) for c, b in node.branches), visit(node.orelse))
        if isinstance(node, Joint | PerQuestion):
            return type(node)(visit(node.loss))
        return node

    return visit(loss), table
