"""``hpt-dsl diff A B``: two recipes side by side: their losses, each estimator's components
and gradient formula, and the settings that differ. Exit codes: 0 (also when they differ),
1 a recipe has errors, 2 usage."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from hpt_dsl.cli.check import print_diagnostics
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpt_dsl.lang.diff import diff
from hpt_dsl.lang.load import analyse


def diff_command(
    a: str = typer.Argument(..., metavar="A", help="a recipe file (.hpt)"),
    b: str = typer.Argument(..., metavar="B", help="another recipe file"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
) -> None:
    """Compare two recipes component by component, with their gradient formulas and settings."""
    console = Console(highlight=False, soft_wrap=True)
    outs = [analyse(Path(f)) for f in (a, b)]
    for out in outs:
        if out.recipe is None:
            print_diagnostics(console, out.diagnostics)
            raise typer.Exit(2 if out.usage else 1)
    info = diff(outs[0].recipe, outs[1].recipe)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False))
        return
    head = Table(title=f"{a}  vs  {b}", title_justify="left")
    head.add_column("")
    head.add_column(Path(a).name)
    head.add_column(Path(b).name)
    head.add_row("loss", info["loss"][0], info["loss"][1])
    head.add_row("algorithm", str(info["algorithm"][0]), str(info["algorithm"][1]))
    console.print(head)
    for pair in info["estimators"]:
        t = Table(title=f"estimator {pair['a'] or '—'}  vs  {pair['b'] or '—'}", title_justify="left")
        t.add_column("")
        t.add_column(Path(a).name)
        t.add_column(Path(b).name)
        for row in pair["rows"]:
            style = "bold yellow" if row["differs"] else ""
            t.add_row(Text(("≠ " if row["differs"] else "  ") + row["key"], style=style), row["a"], row["b"])
        console.print(t)
    if info["settings"]:
        s = Table(title="settings that differ", title_justify="left")
        s.add_column("setting")
        s.add_column(Path(a).name)
        s.add_column(Path(b).name)
        for row in info["settings"]:
            s.add_row(row["key"], row["a"], row["b"])
        console.print(s)
    else:
        console.print("settings: the same")
