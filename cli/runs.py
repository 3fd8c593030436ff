"""``hpt-dsl runs verify RUN_DIR...``: check run folders without loading a model.

Every checkpoint and the final model are checked against their manifests (sizes and CRC-32
checksums), ``metrics.jsonl`` and ``run.json`` are read, and the last line says which
checkpoint a ``--resume`` would take. Exit codes: 0 all sound, 1 something is damaged, 2
not a run folder.
"""

from __future__ import annotations

from pathlib import Path

import typer
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console
from rich.markup import escape

from hpt_dsl.runfolder import verify

app = typer.Typer(help="Inspect run folders.", no_args_is_help=True, add_completion=False)


@app.command("verify")
def verify_command(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="run folders written by 'hpt-dsl run'"),
) -> None:
    """Check checkpoints, the final model and the metrics of run folders (no model is loaded)."""
    console = Console(highlight=False, soft_wrap=True)
    damaged = False
    for run_dir in run_dirs:
        with exit_codes(console):
            findings, verdict = verify(run_dir)
        for f in findings:
            mark = "[red]DAMAGED[/red]" if not f.ok else "note   " if f.note else "[green]ok[/green]     "
            console.print(f"{mark} {escape(str(f.path))}: {escape(f.detail)}")
        damaged |= not all(f.ok for f in findings)
        console.print(f"{escape(str(run_dir))}: {verdict}")
    raise typer.Exit(1 if damaged else 0)
