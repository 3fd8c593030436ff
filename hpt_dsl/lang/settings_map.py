"""Settings statements and ``--set`` overrides to ``hpt_dsl.settings.Settings``, with diagnostics.

A recipe sets run options in blocks (``rollout { n = 8 }``) or one per line
(``train.steps = 100``); the command line overrides them (``--set rollout.n=4``) or
overrides a ``let`` constant (``--set gamma=0.25``). Every unknown section or key and
every value pydantic rejects becomes a diagnostic at the offending spot (file:line:col,
or the ``--set`` argument), listing the valid choices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from hpt_dsl.lang import ast
from hpt_dsl.lang.diagnostics import Sink, one_of, suggest
from hpt_dsl.settings import SECTIONS, Settings

OVERRIDE_FILE = "--set"
INT_MAX = 2**63 - 1


@dataclass(frozen=True)
class Entry:
    """One setting, from the recipe or from ``--set``; ``sink`` is where its problems go."""

    section: str
    key: str
    value: ast.SettingValue
    section_pos: ast.Pos
    key_pos: ast.Pos
    sink: Sink


@dataclass(frozen=True)
class ConstOverride:
    """``--set NAME=value`` for a ``let`` constant."""

    name: str
    value: float
    pos: ast.Pos
    value_pos: ast.Pos


def parse_overrides(overrides: Sequence[str], sink: Sink) -> tuple[list[Entry], list[ConstOverride]]:
    """Split ``--set`` strings into settings entries and constant overrides."""
    entries: list[Entry] = []
    consts: list[ConstOverride] = []
    for i, text in enumerate(overrides, start=1):
        key, eq, raw = text.partition("=")
        key = key.strip()
        vcol = len(text) - len(raw.lstrip()) + 1
        if not eq or not key:
            sink.add(
                "error",
                "E044",
                f"malformed override '{text}'",
                i,
                1,
                len(text) + 1,
                hint="write --set section.key=value (e.g. rollout.n=4) "
                "or --set NAME=value for a `let` constant",
            )
            continue
        vpos = ast.Pos(i, vcol, i, len(text) + 1, OVERRIDE_FILE)
        section, dot, name = key.partition(".")
        if dot:
            spos = ast.Pos(i, 1, i, len(section) + 1, OVERRIDE_FILE)
            kpos = ast.Pos(i, len(section) + 2, i, len(key) + 1, OVERRIDE_FILE)
            entries.append(Entry(section, name, literal(raw.strip(), vpos), spos, kpos, sink))
            continue
        kpos = ast.Pos(i, 1, i, len(key) + 1, OVERRIDE_FILE)
        number = _number(raw.strip())
        if number is None:
            sink.add(
                "error",
                "E044",
                f"'{key}' takes a number, not '{raw.strip()}'",
                i,
                vcol,
                len(text) + 1,
                hint=f"write --set {key}=0.25 (a number or a fraction such as 1/8)",
            )
            continue
        consts.append(ConstOverride(key, number, kpos, vpos))
    return entries, consts


def _number(text: str) -> float | None:
    m = re.fullmatch(r"\s*(-?[\d.eE+-]+)\s*(?:/\s*([\d.eE+-]+)\s*)?", text)
    if not m:
        return None
    try:
        value = float(m.group(1))
        if m.group(2) is not None:
            value /= float(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def literal(text: str, pos: ast.Pos) -> ast.SettingValue:
    """An override's value text as a settings literal: number, quoted string, word or tuple."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return ast.SettingValue("string", text[1:-1], pos)
    if re.fullmatch(r"-?\d+", text):
        digits = text.lstrip("-")
        value = int(text) if len(digits) <= 400 else (-math.inf if text.startswith("-") else math.inf)
        return ast.SettingValue("int", value, pos)
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return ast.SettingValue("float", float(text), pos)
    if len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
        parts = [p.strip() for p in text[1:-1].split(",") if p.strip()]
        return ast.SettingValue("tuple", tuple(literal(p, pos) for p in parts), pos)
    return ast.SettingValue("word", text, pos)


def collect(module: ast.Module, sink: Sink) -> tuple[list[Entry], set[str]]:
    """The settings statements of a file, and the sections it opens with a block."""
    entries: list[Entry] = []
    opened: set[str] = set()
    for stmt in module.stmts:
        if isinstance(stmt, ast.Setting):
            entries.append(Entry(stmt.section, stmt.key, stmt.value, stmt.section_pos, stmt.key_pos, sink))
        elif isinstance(stmt, ast.Block):
            opened.add(stmt.section)
            if stmt.section not in SECTIONS:
                _unknown_section(stmt.section, stmt.section_pos, sink)
                continue
            for s in stmt.items:
                entries.append(Entry(s.section, s.key, s.value, s.section_pos, s.key_pos, sink))
    return entries, opened


def _unknown_section(name: str, pos: ast.Pos, sink: Sink) -> None:
    sink.error(
        "E040", f"unknown settings section '{name}'", pos, hint=suggest(name, list(SECTIONS), "a section")
    )


def build(file_entries: list[Entry], opened: set[str], override_entries: list[Entry]) -> Settings | None:
    """Validate every entry and build Settings; None if anything was wrong (already reported)."""
    ok = True
    chosen: dict[tuple[str, str], Entry] = {}
    reported_sections: set[tuple[str, int, int]] = set()
    for e in file_entries + override_entries:
        if e.section not in SECTIONS:
            spot = (e.section, e.section_pos.line, e.section_pos.col)
            if spot not in reported_sections:
                reported_sections.add(spot)
                _unknown_section(e.section, e.section_pos, e.sink)
            ok = False
            continue
        fields = SECTIONS[e.section].model_fields
        if e.key not in fields:
            e.sink.error(
                "E041",
                f"unknown setting '{e.key}' in section '{e.section}'",
                e.key_pos,
                hint=_key_hint(e.key, e.section),
            )
            ok = False
            continue
        earlier = chosen.get((e.section, e.key))
        if earlier is not None and earlier.sink is e.sink and e.key_pos.src != OVERRIDE_FILE:
            e.sink.error(
                "E043",
                f"{e.section}.{e.key} is set twice (first at line {earlier.key_pos.line})",
                e.key_pos,
                hint="keep one of them",
            )
            ok = False
        chosen[(e.section, e.key)] = e

    per_section: dict[str, dict[str, object]] = {}
    entry_of: dict[tuple[str, str], Entry] = {}
    for (section, key), e in chosen.items():
        value = _python(e.value, e)
        if value is _BAD:
            ok = False
            continue
        per_section.setdefault(section, {})[key] = value
        entry_of[(section, key)] = e

    built: dict[str, object] = {}
    for section, values in per_section.items():
        try:
            built[section] = SECTIONS[section](**values)
        except ValidationError as err:
            ok = False
            for problem in err.errors():
                key = str(problem["loc"][0]) if problem["loc"] else ""
                e = entry_of.get((section, key))
                if e is None:
                    continue
                e.sink.error(
                    "E042",
                    f"invalid value for {section}.{key}: {problem['msg']}",
                    e.value.pos,
                    hint=_field_hint(section, key),
                )
    if not ok:
        return None
    if "critic" in opened and "critic" not in built:
        built["critic"] = SECTIONS["critic"]()
    return Settings(**built)


_BAD = object()


def _python(v: ast.SettingValue, e: Entry) -> object:
    """The Python value of a literal, or _BAD after reporting an out-of-range number."""
    if v.kind == "word":
        lowered = str(v.value).lower()
        return {"true": True, "false": False, "none": None, "null": None}.get(lowered, v.value)
    if v.kind == "tuple":
        items = [_python(x, e) for x in v.value]  # type: ignore[attr-defined]
        return _BAD if any(x is _BAD for x in items) else tuple(items)
    if v.kind in ("int", "float"):
        x = v.value
        if not isinstance(x, int | float) or not math.isfinite(x) or abs(x) > INT_MAX:
            e.sink.error(
                "E014",
                f"number out of range for {e.section}.{e.key}",
                v.pos,
                hint=_field_hint(e.section, e.key),
            )
            return _BAD
    return v.value


def _key_hint(key: str, section: str) -> str:
    fields = list(SECTIONS[section].model_fields)
    hint = suggest(key, fields, f"a setting of '{section}'")
    if not hint.startswith("did you mean"):
        hint = f"the settings of '{section}' are {one_of(fields)}"
    return hint


def _field_hint(section: str, key: str) -> str:
    field = SECTIONS[section].model_fields[key]
    text = f"{section}.{key}"
    if field.description:
        text += f": {field.description}"
    return f"{text} (default {field.default!r})"
