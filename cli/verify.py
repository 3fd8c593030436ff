"""``hpt-dsl verify RECIPE``: the stock components' proofs on every estimator of a recipe.

Prints one table, properties x estimators, each cell ✓ / ✗ / – (not applicable) with the
largest deviation found. Exit codes: 0 every property holds, 1 one fails (or the recipe has
errors), 2 usage (a missing file, a bad --set).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from hpt_dsl.cli.check import SET_HELP, print_diagnostics
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpt_dsl.lang.load import analyse


def verify_command(
    file: str = typer.Argument(..., metavar="FILE", help="a recipe file (.hpt)"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    seed: int = typer.Option(0, "--seed", help="seed of the random batches"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Verify a recipe's estimators: UPGE form, split invariance, finiteness, silent rows, normalisers."""
    console = Console(highlight=False, soft_wrap=True)
    out = analyse(Path(file), overrides=overrides)
    if out.recipe is None:
        print_diagnostics(console, out.diagnostics)
        raise typer.Exit(2 if out.usage else 1)
    from hpt_dsl.verify import PROPERTIES, verify

    with exit_codes(console):
        results = verify(out.recipe, seed=seed)
    failed = any(r.ok is False for r in results)
    if as_json:
        rows = [{"property": r.prop, "term": r.term, "ok": r.ok, "deviation": r.deviation, "note": r.note}
                for r in results]  # fmt: skip
        typer.echo(json.dumps({"file": file, "ok": not failed, "results": rows}, ensure_ascii=False))
        raise typer.Exit(1 if failed else 0)
    terms = list(dict.fromkeys(r.term for r in results))
    table = Table(title=f"{file}: verified on random float64 batches (seed {seed})", title_justify="left")
    table.add_column("property")
    for term in terms:
        table.add_column(term)
    cell = {(r.prop, r.term): r for r in results}
    for prop in PROPERTIES:
        row = []
        for term in terms:
            r = cell[(prop, term)]
            style = "green" if r.ok else "red" if r.ok is False else "dim"
            dev = f" {r.deviation:.1e}" if r.ok is not None and r.deviation not in (0.0,) else ""
            row.append(Text(r.mark + dev, style=style))
        table.add_row(prop, *row)
    console.print(table)
    for r in results:
        if r.ok is False:
            console.print(Text(f"✗ {r.prop} of {r.term}: {r.note} (deviation {r.deviation:.3g})", style="red"))
    console.print(Text("every property holds" if not failed else "a property fails", style="bold"))
    raise typer.Exit(1 if failed else 0)
