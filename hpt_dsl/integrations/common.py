"""What both integrations share: reading a recipe into a loss program, and saying which of
its parts a host trainer cannot feed."""

from __future__ import annotations

import os

from hpt_dsl.estimator.compile import LossProgram
from hpt_dsl.recipe import Recipe

RecipeLike = str | os.PathLike[str] | Recipe | LossProgram
"""Recipe text (one estimator line or a whole recipe), a ``.hpt`` path, a checked Recipe, or a
compiled LossProgram."""


class IntegrationError(ValueError):
    """A recipe (or a trainer setting) that the host trainer cannot run; the message says why
    and what to do."""


def compile_program(recipe: RecipeLike) -> LossProgram:
    """The loss program of ``recipe`` (a path ending in ``.hpt`` is read from disk)."""
    from hpt_dsl import compile_estimator, load_recipe

    if isinstance(recipe, LossProgram):
        return recipe
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and recipe.strip().endswith(".hpt")
                                           and "\n" not in recipe.strip()):  # fmt: skip
        recipe = load_recipe(os.fspath(recipe))
    return compile_estimator(recipe)


def demo_problems(program: LossProgram, host: str) -> list[str]:
    """The terms of ``program`` that read demonstration rows, which ``host``'s batches never hold."""
    return [
        f"term `{t.name}` reads demonstrations (on={t.spec.on}, group={t.spec.group}): "
        f"{host}'s batches hold rollouts only"
        for t in program.terms
        if t.spec.on != "rollouts" or t.spec.group != "rollouts"
    ]


def raise_problems(problems: list[str], what: str) -> None:
    """One IntegrationError listing every problem, or nothing."""
    if problems:
        raise IntegrationError(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))
