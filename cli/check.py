"""``hpt-dsl check FILE...``: every error and warning of one or more recipes.

Exit codes: 0 clean (warnings allowed unless --strict), 1 a recipe has errors (or
warnings under --strict), 2 usage: a file that does not exist or cannot be read, or a
malformed / unknown ``--set``. A file that is not UTF-8 text is a recipe error (1).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from hpt_dsl.lang.diagnostics import Diagnostic
from hpt_dsl.lang.load import analyse

SET_HELP = "override a setting (rollout.n=4) or a let constant (gamma=0.25)"


def check_command(
    files: list[str] = typer.Argument(..., metavar="FILE...", help="recipe files (.hpt)"),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help=SET_HELP,
    ),
    strict: bool = typer.Option(False, "--strict", help="fail on warnings too"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable diagnostics"),
) -> None:
    """Check recipes: syntax, components, settings and semantic rules."""
    console = Console(highlight=False, soft_wrap=True)
    results = []
    usage = failed = False
    errors = warnings = 0
    for path in files:
        out = analyse(Path(path), overrides=overrides)
        n_err = len(out.errors)
        n_warn = len(out.diagnostics) - n_err
        errors, warnings = errors + n_err, warnings + n_warn
        usage |= out.usage
        failed |= n_err > 0 or (strict and n_warn > 0)
        plugins = [p.summary() for p in out.recipe.plugins] if out.recipe is not None else []
        results.append(
            {"file": path, "ok": n_err == 0, "diagnostics": [d.to_dict() for d in out.diagnostics],
             "plugins": plugins}
        )  # fmt: skip
        if not as_json:
            print_diagnostics(console, out.diagnostics)
            for plugin in plugins:  # code this recipe runs on purpose: say so
                console.print(Text(f"{path}: loads plugin {plugin}", style="cyan"))
            status = "ok" if n_err == 0 else "failed"
            extra = f" ({_count(n_err, 'error')}, {_count(n_warn, 'warning')})" if out.diagnostics else ""
            console.print(Text(f"{path}: {status}{extra}", style="green" if n_err == 0 else "red"))
    if as_json:
        typer.echo(json.dumps({"files": results, "errors": errors, "warnings": warnings}, ensure_ascii=False))
    elif len(files) > 1:
        console.print(f"checked {len(files)} files: {_count(errors, 'error')}, {_count(warnings, 'warning')}")
    raise typer.Exit(2 if usage else 1 if failed else 0)


def print_diagnostics(console: Console, diagnostics: list[Diagnostic]) -> None:
    """Each diagnostic in rustc style, the header coloured by severity."""
    for d in diagnostics:
        head, _, rest = d.render().partition("\n")
        console.print(Text(head, style="bold red" if d.is_error else "bold yellow"))
        if rest:
            console.print(Text(rest))
        console.print()


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
