"""hpt-dsl: post-training estimators as one line of a small language.

Public API: ``compile_estimator``, ``load_recipe``, ``check``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpt_dsl.estimator.compile import LossProgram

__version__ = "0.1.0"


def compile_estimator(source: object) -> LossProgram:
    """Compile an estimator or a whole recipe into a loss program (see hpt_dsl.estimator).

    ``source`` is recipe text (one estimator line, or a full recipe with ``loss = ...``),
    a checked ``Recipe``, an ``EstimatorSpec`` or a loss expression.
    """
    from hpt_dsl.estimator.api import compile_estimator as _compile

    return _compile(source)
