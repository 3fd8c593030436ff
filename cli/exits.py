"""Errors to exit codes, for every command in one place (the table in ``hpt_dsl.cli.main``).

    2  bad input: ``hpt_dsl.errors.InputError`` and its subclasses (a model, data file, reward,
       run folder, checkpoint or engine that cannot serve), a missing file, settings that
       pydantic refuses
    3  the run stopped on a fault: ``hpt_dsl.faults.RunFault``

Each is one red line on stderr (the traceback too with ``--debug``).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from hpt_dsl.errors import InputError
from hpt_dsl.faults import RunFault

BAD_INPUT: tuple[type[Exception], ...] = (InputError, FileNotFoundError, ValidationError)
"""The exceptions that mean bad input (exit code 2)."""


@contextmanager
def exit_codes(console: Console, debug: bool = False) -> Iterator[None]:
    """Run a command's body; a run fault leaves with exit code 3, bad input with 2."""
    try:
        yield
    except (RunFault, *BAD_INPUT) as e:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(getattr(e, "exit_code", InputError.exit_code)) from None
