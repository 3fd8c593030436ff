"""Errors that mean bad input, whichever part of the library finds them.

``InputError`` is the base of the errors a user fixes by changing what they gave (a file, a
setting, a plugin): the command line answers them with one line and exit code 2. Run faults
(exit code 3) are ``hpt_dsl.faults.RunFault``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input found before or while setting up a run (exit code 2)."""


class SetupError(InputError):
    """Bad input found before training starts: a run folder, a resume target, a DeepSpeed
    configuration (exit code 2)."""
