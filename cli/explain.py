"""``hpt-dsl explain FILE``: what a recipe computes, in words and formulas.

Prints the loss, the algorithm it matches, the gate as a table, each estimator's
components with their meaning and its per-token gradient, each term's normaliser, and what
the run needs.
Exit codes as ``check``: 1 when the recipe has errors, 2 for usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from hpt_dsl.cli.check import SET_HELP, print_diagnostics
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpt_dsl.lang.explain import explain
from hpt_dsl.lang.load import analyse


def explain_command(
    file: str = typer.Argument(..., metavar="FILE", help="a recipe file (.hpt)"),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help=SET_HELP,
    ),
    as_json: bool = typer.Option(False, "--json", help="print the explanation as JSON"),
) -> None:
    """Explain a recipe: its estimators, their gradient formulas, the gate and what the run needs."""
    console = Console(highlight=False, soft_wrap=True)
    out = analyse(Path(file), overrides=overrides)
    if out.recipe is None:
        if as_json:
            typer.echo(json.dumps({"file": file, "diagnostics": [d.to_dict() for d in out.diagnostics]}))
        else:
            print_diagnostics(console, out.diagnostics)
        raise typer.Exit(2 if out.usage else 1)
    info = explain(out.recipe)
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False))
        return
    console.print(Text(f"{file}", style="bold"))
    console.print(Text(f"loss = {info['loss']}"))
    console.print(
        Text(f"algorithm: {info['algorithm'] or 'custom'} — {info['description']}", style="bold green")
    )
    if info["gate"]:
        gate = Table(title="gate (decided per question)", title_justify="left")
        gate.add_column("when")
        gate.add_column("loss")
        for row in info["gate"]:
            gate.add_row(row["when"], row["loss"])
        console.print(gate)
    for est in info["estimators"]:
        match = est["match"]
        known = (
            match["name"] or f"none (closest: {match['closest']}, differs in {', '.join(match['differs'])})"
        )
        table = Table(title=f"estimator '{est['name']}' — matches {known}", title_justify="left")
        table.add_column("component")
        table.add_column("value")
        table.add_column("meaning")
        for key, value in est["components"].items():
            table.add_row(key, value, est["meaning"][key])
        console.print(table)
        f = est["formula"]
        console.print(Text(f"  {f['gradient']}"))
        if f["where"]:
            console.print(Text(f"  where {f['where']}"))
        console.print(Text(f"  aggregated as {f['aggregate']}"))
        if f["regularizers"]:
            console.print(Text(f"  regularizers: {f['regularizers']}"))
    norms = Table(title="normalisers (how each term's token losses are summed and divided)", title_justify="left")
    norms.add_column("term")
    norms.add_column("formula")
    norms.add_column("in words")
    for row in info["normalisers"]:
        norms.add_row(row["term"], row["formula"], row["words"])
    console.print(norms)
    needs = Table(title="the run needs", title_justify="left")
    needs.add_column("what")
    needs.add_column("needed")
    for key, value in info["needs"].items():
        needs.add_row(key.replace("_", " "), "yes" if value else "no")
    console.print(needs)
    print_diagnostics(console, list(out.recipe.warnings))
