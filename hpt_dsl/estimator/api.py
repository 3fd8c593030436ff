"""``compile_estimator``: the one public entry point of the compiler.

from hpt_dsl import compile_estimator
est = compile_estimator("mask=clip(0.2) denom=pi_old adv=group_norm grad=loglik agg=token_mean")
out = est(logprobs=..., old_logprobs=..., rewards=..., group_ids=..., response_mask=...)
out.loss.backward(); out.metrics
"""

from __future__ import annotations

from hpt_dsl.estimator.compile import LossProgram, compile_loss, compile_recipe, compile_spec
from hpt_dsl.recipe import EstimatorSpec, Gate, Joint, PerQuestion, Recipe, Scale, Sum, Term, Zero


def compile_estimator(source: object) -> LossProgram:
    """Compile a checked Recipe, an EstimatorSpec or a loss expression into a LossProgram.
    (Recipe text goes through ``hpt_dsl.compile_estimator``, which sits above the language and
    the estimator: the estimator never imports the language.)"""
    if isinstance(source, Recipe):
        return compile_recipe(source)
    if isinstance(source, EstimatorSpec):
        return compile_spec(source)
    if isinstance(source, (Term, Scale, Sum, Gate, Zero, Joint, PerQuestion)):
        return compile_loss(source)
    if isinstance(source, str):
        raise TypeError("recipe text is compiled by hpt_dsl.compile_estimator, which reads it with the language first")
    raise TypeError(
        f"compile_estimator takes recipe text, a Recipe, an EstimatorSpec or a loss expression; "
        f"got {type(source).__name__}"
    )
