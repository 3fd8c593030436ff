"""The .hpt language: grammar, parser, checker and prelude.

    load_recipe(path_or_text, overrides=(), text=None) -> Recipe   (raises RecipeError)
    check(path_or_text, overrides=())                  -> list[Diagnostic]

Imports neither torch nor transformers, so checking a recipe takes a fraction of a second.
"""

from hpt_dsl.lang.diagnostics import Diagnostic, RecipeError
from hpt_dsl.lang.load import analyse, check, load_recipe

__all__ = ["Diagnostic", "RecipeError", "analyse", "check", "load_recipe"]
