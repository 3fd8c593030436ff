"""The estimator compiler: checked recipes become loss programs over tensors.

    from hpt_dsl.estimator import compile_recipe, LossProgram, Prepared, LossOutput
    program = compile_recipe(recipe)
    prep = program.prepare(rewards=..., group_ids=..., response_mask=..., is_demo=...)
    out = program.loss(prep, logprobs=mb_logprobs, rows=idx)

One module per component kind (mask, denom, adv, grad, agg, regularize, gate), each
component a function registered by name (registry.register); stats.py computes the
per-question statistics, compile.py flattens a recipe into terms, program.py runs them.
"""

from __future__ import annotations

from hpt_dsl.estimator.compile import (
    LossOutput,
    LossProgram,
    Prepared,
    compile_loss,
    compile_recipe,
    compile_spec,
)
from hpt_dsl.estimator.registry import lookup, names, register

__all__ = [
    "LossOutput",
    "LossProgram",
    "Prepared",
    "compile_loss",
    "compile_recipe",
    "compile_spec",
    "lookup",
    "names",
    "register",
]
