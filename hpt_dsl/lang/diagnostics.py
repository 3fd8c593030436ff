"""Diagnostics: what is wrong, where, and what to do about it.

Every problem the language front end finds is a ``Diagnostic``; nothing else escapes.
Rendered in the style of rustc and Elm:

    recipes/x.hpt:1:30: error[E012]: unknown advantage 'group_nrom'
      |
    1 | loss = mask=clip(0.2) adv=group_nrom
      |                           ^^^^^^^^^^
      = help: did you mean 'group_norm'?

Codes are stable (tests and ``--json`` consumers rely on them); the table lives in
``CODES`` and in the language reference (docs/language.md).
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]

CODES: dict[str, str] = {
    "E001": "unexpected character",
    "E002": "unexpected token or end of input",
    "E003": "unbalanced bracket",
    "E004": "expression nested too deeply",
    "E005": "not UTF-8 text / binary file",
    "E006": "the recipe defines no loss",
    "E007": "file not found or unreadable",
    "E010": "unknown component key",
    "E011": "unknown name",
    "E012": "unknown component value",
    "E013": "wrong number of arguments",
    "E014": "value out of range",
    "E016": "component given twice",
    "E017": "name or loss defined twice",
    "E018": "type error (a loss, a number and a condition used in the wrong place)",
    "E019": "components added to something that is not an estimator",
    "E020": "old-policy denominator on demonstrations",
    "E021": "group advantage with one rollout per question",
    "E022": "adv=gae without a critic",
    "E023": "gate on a rollout statistic with no rollouts",
    "E024": "incompatible components",
    "E025": "unknown loss function",
    "E026": "a joint normaliser over per-question and mini-batch terms",
    "E050": "a plugin that cannot be read (missing, a syntax error, a bad declaration)",
    "E040": "unknown settings section",
    "E041": "unknown setting",
    "E042": "invalid setting value",
    "E043": "setting given twice",
    "E044": "malformed --set override",
    "E045": "DAPO sampling settings that cannot work (one rollout per group, an overlong cache past the budget)",
    "W030": "gate branch that can never be taken",
    "W031": "clip mask with denom=pi_theta (the ratio is identically 1)",
    "W032": "knob with no effect in the configured run",
    "W033": "pass-rate threshold between two values acc can take",
}


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning, with its place and a fix.

    line and col are 1-based; end_col is exclusive (the caret underline spans
    col..end_col-1 on ``line``). ``line_text`` is the offending source line, so that a
    diagnostic renders without the file at hand.
    """

    severity: Severity
    code: str
    message: str
    file: str = "<recipe>"
    line: int | None = None
    col: int | None = None
    end_col: int | None = None
    hint: str | None = None
    line_text: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def header(self) -> str:
        """``file:line:col: error[E012]: message``"""
        place = self.file
        if self.line is not None:
            place += f":{self.line}"
            if self.col is not None:
                place += f":{self.col}"
        return f"{place}: {self.severity}[{self.code}]: {self.message}"

    def render(self) -> str:
        """The full rustc-style text: header, source line, caret underline, help."""
        out = [self.header()]
        if self.line is not None and self.line_text is not None:
            gutter = str(self.line)
            pad = " " * len(gutter)
            start = max((self.col or 1) - 1, 0)
            end = self.end_col - 1 if self.end_col and self.col and self.end_col > self.col else start + 1
            shown, offset = _window(self.line_text, start)
            out.append(f"{pad} |")
            out.append(f"{gutter} | {printable(shown)}")
            if self.col is not None:
                start, end = start - offset, min(end - offset, max(len(shown), start - offset + 1))
                out.append(f"{pad} | {' ' * start}{'^' * max(end - start, 1)}")
        if self.hint:
            lead = " " * (len(str(self.line)) if self.line is not None else 0)
            out.append(f"{lead} = help: {self.hint}")
        return "\n".join(out)


class RecipeError(Exception):
    """A recipe that cannot be used; ``.diagnostics`` holds every problem found."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        errors = [d for d in self.diagnostics if d.is_error] or self.diagnostics
        super().__init__("\n\n".join(d.render() for d in errors))


WIDTH = 100
"""Longest source excerpt shown; longer lines are cut around the column."""


def _window(line: str, col0: int) -> tuple[str, int]:
    """(excerpt, index of its first character in ``line``), at most WIDTH characters."""
    if len(line) <= WIDTH:
        return line, 0
    first = max(0, min(col0 - WIDTH // 3, len(line) - WIDTH))
    excerpt = line[first : first + WIDTH]
    if first > 0:
        excerpt = "…" + excerpt[1:]
    if first + WIDTH < len(line):
        excerpt = excerpt[:-1] + "…"
    return excerpt, first


def printable(text: str) -> str:
    """The line as it can be shown: one visible character per source character (so
    carets stay aligned), tabs as spaces, control and unpaired surrogate characters as '?'."""
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs", "Cn", "Co"):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest known spelling of ``word``, if any is close enough."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def one_of(choices: Iterable[str]) -> str:
    """``'a', 'b' or 'c'``"""
    items = [f"'{c}'" for c in choices]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def suggest(word: str, choices: Sequence[str], what: str) -> str:
    """A fix hint: the closest choice when there is one, else the list of valid ones."""
    near = did_you_mean(word, choices)
    if near is not None:
        return f"did you mean '{near}'?"
    return f"{what} is one of {one_of(choices)}"


class Sink:
    """Collects diagnostics for one source text and fills in file and line text."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = text.split("\n")
        self.items: list[Diagnostic] = []
        self._seen: set[tuple[object, ...]] = set()

    def add(
        self,
        severity: Severity,
        code: str,
        message: str,
        line: int | None = None,
        col: int | None = None,
        end_col: int | None = None,
        hint: str | None = None,
    ) -> None:
        key = (severity, code, message, line, col)
        if key in self._seen:
            return
        self._seen.add(key)
        text = self.lines[line - 1] if line is not None and 0 < line <= len(self.lines) else None
        self.items.append(Diagnostic(severity, code, message, self.file, line, col, end_col, hint, text))

    def error(self, code: str, message: str, pos: object = None, hint: str | None = None) -> None:
        self.add("error", code, message, *_place(pos), hint=hint)

    def warning(self, code: str, message: str, pos: object = None, hint: str | None = None) -> None:
        self.add("warning", code, message, *_place(pos), hint=hint)

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.items)


def _place(pos: object) -> tuple[int | None, int | None, int | None]:
    """(line, col, end_col) of anything with line/col/end_line/end_col attributes."""
    if pos is None:
        return None, None, None
    line = getattr(pos, "line", None)
    col = getattr(pos, "col", None)
    end_line = getattr(pos, "end_line", None)
    end_col = getattr(pos, "end_col", None)
    if end_line != line:
        end_col = None
    return line, col, end_col
