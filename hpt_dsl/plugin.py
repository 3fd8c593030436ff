"""Your own components, without a fork: the decorator a plugin module uses.

A plugin is a Python module (a file beside the recipe, or an importable module) whose
functions are marked with ``@component``; a recipe names it with ``use "my_components.py"``::

    from hpt_dsl.plugin import component

    @component("adv", "sign", meaning="+1 if the reward beats 0.5, else -1", formula="Â = sign(R − 0.5)")
    def sign(inp):
        return torch.sign(inp.rewards - 0.5)

The checker reads the decorators' arguments from the module's source without running it
(``hpt_dsl.lang.plugins``), so ``hpt-dsl check`` never imports the plugin nor torch; the
arguments must therefore be literals (strings, numbers, lists, tuples, dicts, True/False/None).
``compile`` and ``run`` import the module and register each function under its name.

What each kind's function receives (the component's own parameters follow, in the order
the recipe writes them, e.g. ``mask=trust(0.2)`` passes 0.2 as ``eps``):

    kind     signature                                   returns
    adv      f(inp: AdvInputs, *params)                  (B,) or (B, T) advantages, no gradient
    mask     f(t: TokenInputs, lik, shape, *params)      (J, clipped): the token objective and a bool mask or None
    denom    f(t: TokenInputs)                           a Likelihood (see hpt_dsl.estimator.denom)
    grad     f(*params)                                  the shaping function x -> f(x)
    agg      f(length, n_tok, n_seq, *params)            (B,) per-row token weights a_i
    kl       f(d)                                        per-token KL estimate from d = log pi_ref - log pi
    stat     f(rewards, group, n_groups, rollout)        (Q,) a per-question statistic, usable in gates
    reward   f(response: str, answer: str)               a float

Declared properties (checked by ``hpt-dsl verify``, never assumed):

    upge=True              (mask) the gradient is the unified one times a 0/1 stable mask
    zero_at_zero_adv=True  (mask) a token with A = 0 has J = 0 and no gradient (lets the learner
                           skip rows whose every advantage is 0)
    scope="question"       (adv) a row's advantage depends only on its own question's rows;
                           "batch" if it is standardised over the batch (then taken over the step)
    weights="tokens"       (agg) sum_i a_i |y_i| = 1 over the term's rows; "rows": sum_i a_i = 1
                           over its non-empty rows; "constant": neither (a fixed divisor)
    needs=("old_logprobs",)  what the component reads besides the log-probs: old_logprobs,
                           ref_model, critic, entropy
    ranges={"eps": (0, 1)} open intervals for the parameters, checked by the checker
    meaning="...", formula="..."  for ``explain`` and the checker's messages
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

KINDS = ("mask", "denom", "adv", "grad", "agg", "kl", "stat", "reward")
"""The kinds a plugin may add."""

FIXED = {"mask": 3, "denom": 1, "adv": 1, "grad": 0, "agg": 3, "kl": 1, "stat": 4, "reward": 2}
"""How many leading arguments of each kind's function are not the component's parameters."""

F = TypeVar("F", bound=Callable[..., Any])


def component(kind: str, name: str, **declared: Any) -> Callable[[F], F]:
    """Mark ``fn`` as the component ``kind=name`` of a plugin (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")

    def deco(fn: F) -> F:
        fn.__hpt_component__ = (kind, name, dict(declared))  # type: ignore[attr-defined]
        return fn

    return deco
