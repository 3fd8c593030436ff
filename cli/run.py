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
import traceback
from pathlib import Path

import typer
from hpt_dsl.cli.check import SET_HELP, print_diagnostics
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hpt_dsl.lang.load import analyse


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), imported lazily."""
    from hpt_dsl import hub, models
    from hpt_dsl.checkpoint import CheckpointError
    from hpt_dsl.data.files import DataError
    from hpt_dsl.data.verify import RewardError
    from hpt_dsl.errors import InputError
    from hpt_dsl.rollout.vllm import RolloutEngineError
    from hpt_dsl.train import SetupError

    return (
        InputError,
        models.ModelError,
        hub.ModelError,
        DataError,
        RewardError,
        SetupError,
        RolloutEngineError,
        CheckpointError,
        FileNotFoundError,
    )


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
    import torch

    from hpt_dsl.train import RunFault, RunInterrupted, SetupError, cpu_threads, default_run_dir, train

    r = checked.recipe
    if cpu_threads(r.settings):
        torch.set_num_threads(cpu_threads(r.settings))
    run_dir = resume or output or (Path(r.settings.train.output_dir) if r.settings.train.output_dir else None)
    run_dir = run_dir or default_run_dir(r)
    if r.settings.train.output_dir and (resume or output) and Path(r.settings.train.output_dir) != run_dir:
        console.print(f"[yellow]warning:[/yellow] train.output_dir = {escape(r.settings.train.output_dir)} has no "
                      f"effect: {'--resume' if resume else '--output'} {escape(str(run_dir))} is the run folder")
    try:
        if resume is not None and not resume.is_dir():
            raise SetupError(f"--resume {resume}: no such run folder")
        # stdout carries only the JSON lines: whatever a library prints goes to stderr
        json_stream = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            train(r, run_dir, resume=resume is not None, quiet=quiet, json_logs=json_logs, json_stream=json_stream,
                  plots=plots)
    except RunInterrupted as e:
        console.print(f"[yellow]{escape(str(e))}[/yellow]")
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted before the first step; nothing to resume[/yellow]")
        raise typer.Exit(130) from None
    except RunFault as e:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(3) from None
    except _bad_input_errors() as e:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
