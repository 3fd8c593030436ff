"""``hpt-dsl compare RECIPE... [--seeds N] [--set key=value ...]``: recipes side by side.

Every recipe runs with the same overrides and seeds 0 .. N-1; finished runs in the output
folder are reused and unfinished ones resumed. Prints the table, writes it as Markdown and
CSV, draws the figures and prints their paths.

Exit codes: 0 done, 1 a recipe has errors, 2 usage (missing file, bad --set, bad option),
3 a run stopped on a fault, 130 interrupted (finished runs are kept and reused next time).
"""

from __future__ import annotations

from pathlib import Path

import typer
from hpt_dsl.cli.check import SET_HELP, print_diagnostics
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console

from hpt_dsl.compare import Job, compare, rich_table
from hpt_dsl.lang.load import analyse


def compare_command(
    recipes: list[str] = typer.Argument(..., metavar="RECIPE...", help="recipe files (.hpt)"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="seeds per recipe (0 .. N-1)"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="folder for runs, table and figures"),
    jobs: int = typer.Option(
        0, "--jobs", "-j", min=0, help="runs at once, as processes (0 = one per CPU core, 1 with a GPU)"
    ),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads per run (0 = cores / jobs)"),
    pass_k: int = typer.Option(
        0, "--pass-k", min=0, help="also evaluate each final model with K samples per test question (pass@k)"
    ),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run recipes with identical data, model, budget and seeds; table, CSV, Markdown, figures."""
    console = Console(highlight=False, soft_wrap=True)
    for path in recipes:
        checked = analyse(path, overrides=overrides)
        if checked.recipe is None:
            print_diagnostics(console, checked.diagnostics)
            raise typer.Exit(2 if checked.usage else 1)

    def event(kind: str, job: Job) -> None:
        verb = {"reuse": "reused", "start": "running", "queue": "queued", "done": "finished",
                "failed": "FAILED"}
        console.print(f"{verb[kind]:>8}  {job.label} seed {job.seed}  [dim]{job.run_dir}[/dim]")

    from concurrent.futures.process import BrokenProcessPool

    from hpt_dsl.process import RunInterrupted

    try:
        with exit_codes(console, debug):
            result = compare(
                recipes, seeds, overrides, out, parallel=jobs, threads=threads, on_event=event, pass_k=pass_k
            )
    except (KeyboardInterrupt, RunInterrupted):
        console.print("[yellow]interrupted: finished runs are kept and reused, unfinished ones resumed "
                      "when the same command runs again[/yellow]")
        raise typer.Exit(130) from None
    except BrokenProcessPool:
        console.print("[red]error:[/red] a training process died (out of memory?); finished runs are kept. "
                      "Run the same command again, with fewer --jobs")
        raise typer.Exit(3) from None
    console.print(rich_table(result.rows))
    console.print(f"table: {result.markdown}  {result.csv}")
    for p in result.figures:
        console.print(str(p))
    for job, message in result.failures:
        console.print(f"[red]failed:[/red] {job.label} seed {job.seed}: {message}")
    if result.failures:
        raise typer.Exit(3)
