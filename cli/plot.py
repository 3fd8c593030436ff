"""``hpt-dsl plot RUN_DIR...``: figures of one or more runs, PNG and SVG.

Runs of the same recipe (several seeds) are drawn as one line with a band of one standard
deviation. Exit codes: 0 figures written, 2 a folder that is not a run folder.
"""

from __future__ import annotations

from pathlib import Path

import typer
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console

from hpt_dsl.plot import FORMATS, plot_runs
from hpt_dsl.runs import load_run


def plot_command(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR...", help="run folders written by 'hpt-dsl run'"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="folder for the figures (default: RUN_DIR/plots for one run, else ./plots)"
    ),
    svg: bool = typer.Option(True, "--svg/--no-svg", help="write an SVG beside each PNG"),
    note: str | None = typer.Option(
        None, "--note", help="small print under every figure: where, when and how the runs were made"
    ),
) -> None:
    """Draw accuracy, reward, gate split, loss terms, entropy, response length and pass@k."""
    console = Console(highlight=False, soft_wrap=True)
    with exit_codes(console):
        runs = [load_run(p) for p in run_dirs]
    target = out or (run_dirs[0] / "plots" if len(run_dirs) == 1 else Path("plots"))
    formats = FORMATS if svg else ("png",)
    paths = plot_runs(out_dir=target, runs=runs, formats=formats, note=note)
    if not paths:
        console.print("[yellow]no figures: the runs recorded no metrics yet[/yellow]")
        return
    for p in paths:
        console.print(str(p))
