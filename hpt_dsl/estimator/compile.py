"""The compiler: a checked Recipe becomes a LossProgram, a pure function over tensors.

    program = compile_recipe(recipe)
    prep = program.prepare(rewards=..., group_ids=..., response_mask=..., is_demo=..., ...)
    for rows in micro_batches:                       # any split of range(B)
        out = program.loss(prep, logprobs=lp[rows], rows=rows)
        out.loss.backward()                          # sum over micro-batches == full-batch loss

Compiling flattens the loss tree into (estimator, per-question weight) terms (gate.py)
and looks every component up in the registry; program.py runs them.
"""

from __future__ import annotations

from hpt_dsl.estimator import adv as _adv  # noqa: F401  (registers the components)
from hpt_dsl.estimator import agg as _agg  # noqa: F401
from hpt_dsl.estimator import denom as _denom  # noqa: F401
from hpt_dsl.estimator import grad as _grad  # noqa: F401
from hpt_dsl.estimator import mask as _mask  # noqa: F401
from hpt_dsl.estimator import regularize as _regularize  # noqa: F401
from hpt_dsl.estimator.gate import flatten, merged
from hpt_dsl.estimator.plugins import declared_needs, import_plugins
from hpt_dsl.estimator.program import CompiledTerm, LossOutput, LossProgram, Prepared
from hpt_dsl.estimator.registry import lookup
from hpt_dsl.recipe import EstimatorSpec, LossExpr, Needs, Recipe, Term, estimator_needs, stats_used
from hpt_dsl.settings import Settings


def _check_spec(spec: EstimatorSpec, name: str) -> None:
    if spec.grad.name == "shaped" and spec.denom == "pi_theta":
        raise ValueError(
            f"estimator {name}: grad=shaped applies to a ratio or pi_theta; use denom=pi_old, "
            f"pi_old_seq or 1 (with denom=pi_theta there is nothing to shape)"
        )
    if spec.grad.name == "shaped" and spec.mask.name == "cispo":
        raise ValueError(f"estimator {name}: mask=cispo sets its own likelihood term; use grad=loglik")


def derive_needs(specs: list[EstimatorSpec]) -> Needs:
    """What a list of estimators needs at run time (used when there is no checked recipe);
    the same rule as the checker's (``hpt_dsl.recipe.estimator_needs``)."""
    extra: set[str] = set().union(*(estimator_needs(s, declared_needs()) for s in specs)) if specs else set()
    return Needs(
        rollouts=any(s.on != "demos" or s.group != "rollouts" for s in specs),
        demos=any(s.on != "rollouts" or s.group != "rollouts" for s in specs),
        old_logprobs="old_logprobs" in extra,
        ref_model="ref_model" in extra,
        critic="critic" in extra,
        entropy="entropy" in extra,
    )


def compile_loss(loss: LossExpr, settings: Settings | None = None, needs: Needs | None = None) -> LossProgram:
    """Compile a loss tree (terms, scales, sums, gates) into a LossProgram."""
    settings = settings or Settings()
    pairs, branches = flatten(loss)
    terms: list[CompiledTerm] = []
    seen: set[str] = set()
    for k, (spec, weight, scope) in enumerate(merged(pairs)):
        name = spec.name or f"term{k}"
        while name in seen:
            name = f"{name}#{k}"
        seen.add(name)
        _check_spec(spec, name)
        terms.append(
            CompiledTerm(
                name=name,
                spec=spec,
                weight=weight,
                scope=scope,
                denom=lookup("denom", spec.denom),
                mask=lookup("mask", spec.mask.name),
                shape=lookup("grad", spec.grad.name)(*spec.grad.args),
                adv=lookup("adv", spec.adv.name),
                agg=lookup("agg", spec.agg.name),
                kl=lookup("kl", spec.kl.name) if spec.kl is not None else None,
            )
        )
    if needs is None:
        needs = derive_needs([t.spec for t in terms])
    return LossProgram(terms, branches, settings, needs, stats_used(loss))


def compile_recipe(recipe: Recipe) -> LossProgram:
    """Compile a checked recipe, importing the plugins it names (``use "..."``)."""
    import_plugins(recipe.plugins)
    return compile_loss(recipe.loss, recipe.settings, recipe.needs)


def compile_spec(spec: EstimatorSpec, settings: Settings | None = None) -> LossProgram:
    """Compile a single estimator (weight 1 on every question)."""
    return compile_loss(Term(spec), settings)


__all__ = [
    "CompiledTerm",
    "LossOutput",
    "LossProgram",
    "Prepared",
    "compile_loss",
    "compile_recipe",
    "compile_spec",
    "derive_needs",
]
