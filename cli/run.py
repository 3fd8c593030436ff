"""``hpt-dsl run RECIPE``: post-train with the recipe's estimator, end to end.

Exit codes (the table in ``hpt_dsl.cli.main``): 0 done, 1 the recipe has errors, 2 bad input
(a missing model, data file or run folder, a bad --set, a missing DeepSpeed, no complete
checkpoint to resume from), 3 stopped on a fault (too many non-finite steps, a write that
failed, another process that stopped; the last complete checkpoint is kept), 130
interrupted (a checkpoint was saved; continue with --resume). The recipe's warnings, a
setting that has no effect among them, are printed before the run starts.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer
from hpt_dsl.cli.check import SET_HELP, print_diagnostics
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hpt_dsl.lang.load import analyse
from hpt_dsl.process import RunInterrupted, command_signals


def run_command(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe file (.hpt)"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="run folder (default runs/<recipe>-<time>)"),
    resume: Path | None = typer.Option(None, "--resume", metavar="RUN_DIR", help="continue this run folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live view, no summary"),
    json_logs: bool = typer.Option(False, "--json-logs", help="print each metrics line as JSON on stdout"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw the run's figures into RUN_DIR/plots at the end"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Train: rollouts, rewards, gates, updates, evaluation, checkpoints, final model."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    checked = analyse(recipe, overrides=overrides)
    if checked.recipe is None:
        print_diagnostics(console, checked.diagnostics)
        raise typer.Exit(2 if checked.usage else 1)
    if os.environ.get("RANK", "0") == "0":  # the first process of a run speaks for all
        for d in checked.diagnostics:  # warnings, one line each: settings with no effect, dead branches
            console.print(Text(d.render().partition("\n")[0] + (f" ({d.hint})" if d.hint else ""), style="yellow"))
    if resume is not None and output is not None and resume != output:
        console.print("[red]error:[/red] give either --resume RUN_DIR or --output DIR, not both")
        raise typer.Exit(2)
    from hpt_dsl.train import run_recipe

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {escape(message)}")

    json_stream = sys.stdout  # stdout carries only the JSON lines: whatever a library prints goes to stderr
    with command_signals(), exit_codes(console, debug):  # a launcher's SIGTERM does not cut the message short
        try:
            with contextlib.redirect_stdout(sys.stderr):
                run_recipe(checked.recipe, output=resume or output, resume=resume is not None, quiet=quiet,
                           json_logs=json_logs, json_stream=json_stream, plots=plots, set_threads=True, warn=warn)
        except RunInterrupted as e:
            console.print(f"[yellow]{escape(str(e))}[/yellow]")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted before the first step; nothing to resume[/yellow]")
            raise typer.Exit(130) from None
