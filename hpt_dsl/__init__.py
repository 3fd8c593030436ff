"""hpt-dsl: post-training estimators as one line of a small language.

Public API: ``compile_estimator``, ``load_recipe``, ``check``.
"""

from __future__ import annotations

__version__ = "0.1.0"
