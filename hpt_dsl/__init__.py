"""hpt-dsl: post-training estimators as one line of a small language.

Public API: ``compile_estimator``, ``load_recipe``, ``check``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from hpt_dsl.estimator.compile import LossProgram
    from hpt_dsl.lang.diagnostics import Diagnostic
    from hpt_dsl.recipe import Recipe

__version__ = "0.1.0"


def compile_estimator(source: object) -> LossProgram:
    """Compile an estimator or a whole recipe into a loss program (see hpt_dsl.estimator).

    ``source`` is recipe text (one estimator line, or a full recipe with ``loss = ...``),
    a checked ``Recipe``, an ``EstimatorSpec`` or a loss expression.
    """
    from hpt_dsl.estimator.api import compile_estimator as _compile

    if isinstance(source, str):
        source = load_recipe(text=source)
    return _compile(source)


def load_recipe(
    source: str | os.PathLike[str] | None = None, *, overrides: Sequence[str] = (), text: str | None = None
) -> Recipe:
    """Parse and check a recipe (a path, or the recipe text itself) into a ``Recipe``.

    ``overrides`` are ``--set`` strings (``rollout.n=4``, ``gamma=0.25``). Raises
    ``hpt_dsl.lang.RecipeError`` with ``.diagnostics`` when the recipe has errors.
    """
    from hpt_dsl.lang import load_recipe as _load

    return _load(source, overrides=overrides, text=text)


def check(path_or_text: str | os.PathLike[str], overrides: Sequence[str] = ()) -> list[Diagnostic]:
    """Every error and warning of a recipe, as ``Diagnostic`` values (never raises)."""
    from hpt_dsl.lang import check as _check

    return _check(path_or_text, overrides)
