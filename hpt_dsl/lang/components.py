"""The vocabulary of estimator components: every key, every value, its arity and ranges.

One table (``VOCAB``) drives the checker (unknown names, arity, ranges, normalisation),
``explain`` (meaning and formula of each part) and the language reference in the docs.
Adding a component value is one ``Form`` here plus its implementation in the compiler.

Normalised arguments (what EstimatorSpec holds):
    clip(e)            -> clip(e, e)             seq_clip(e) -> seq_clip(e, e)
    dual_clip(e, c)    -> dual_clip(e, e, c)     adv=c (a number) -> const(c)
    token_sum_norm     -> token_sum_norm(L), L = rollout.max_new_tokens (token_sum likewise)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from hpt_dsl.recipe import GROUP_ADVANTAGES, Call  # noqa: F401  (re-exported)

Check = Callable[[tuple[float, ...]], "tuple[int, str] | None"]
"""Range check on the arguments: None if fine, else (index of the bad argument, what is allowed)."""


def _each(ok: Callable[[float], bool], what: str) -> Check:
    def check(args: tuple[float, ...]) -> tuple[int, str] | None:
        for i, x in enumerate(args):
            if not ok(x):
                return i, what
        return None

    return check


_EPS = _each(lambda x: 0 < x < 1, "a clip range must be in (0, 1)")


def _dual_clip(args: tuple[float, ...]) -> tuple[int, str] | None:
    bad = _EPS(args[:-1])
    if bad is not None:
        return bad
    if not 1 < args[-1] < math.inf:
        return len(args) - 1, "c must be a finite number > 1"
    return None


_UNIT = _each(lambda x: 0 <= x <= 1, "must be in [0, 1]")
_POS = _each(lambda x: 0 < x < math.inf, "must be a positive finite number")
_NONNEG = _each(lambda x: 0 <= x < math.inf, "must be a finite number >= 0")
_FINITE = _each(math.isfinite, "must be a finite number")


def _gae_args(args: tuple[float, ...]) -> tuple[int, str] | None:
    bad = _UNIT(args[:2])
    if bad is not None:
        return bad
    if len(args) == 3 and args[2] not in (0, 1):
        return 2, "whiten is 1 (whiten the advantages over the step) or 0 (do not)"
    return None


@dataclass(frozen=True)
class Form:
    """One value a component may take.

    arity:   the accepted numbers of arguments; (0,) means written without parentheses
    params:  argument names, for messages and docs (of the longest form)
    meaning: one line for explain and the docs
    formula: its place in  grad = 1_stable * (1/pi_ref) * A_hat * grad(pi_theta)
    """

    name: str
    arity: tuple[int, ...] = (0,)
    params: tuple[str, ...] = ()
    meaning: str = ""
    formula: str = ""
    check: Check | None = None
    source: str = ""


def _forms(*forms: Form) -> dict[str, Form]:
    return {f.name: f for f in forms}


VOCAB: dict[str, dict[str, Form]] = {
    "mask": _forms(
        Form("none", meaning="every token contributes", formula="𝟙_stable = 1"),
        Form(
            "clip",
            (1, 2),
            ("eps_low", "eps_high"),
            "PPO's pessimistic clip: a token stops contributing once its ratio r = π_θ/π_old left "
            "[1−eps_low, 1+eps_high] in the direction its advantage favours",
            "𝟙[Â>0 ⇒ r ≤ 1+eps_high; Â<0 ⇒ r ≥ 1−eps_low]",
            _EPS,
            "Schulman et al. 2017 (PPO); asymmetric: Yu et al. 2025 (DAPO)",
        ),
        Form(
            "dual_clip",
            (2, 3),
            ("eps_low", "eps_high", "c"),
            "clip, and the loss of a negative-advantage token is bounded by c·|Â| (c > 1)",
            "𝟙[Â>0 ⇒ r ≤ 1+eps_high; Â<0 ⇒ 1−eps_low ≤ r ≤ c]",
            _dual_clip,
            "Ye et al. 2020 (dual-clip PPO)",
        ),
        Form(
            "cispo",
            (1,),
            ("eps_high",),
            "CISPO: keeps every token, weighting log π_θ by the stop-gradient IS weight min(r, 1+eps_high)",
            "sg(min(r, 1+eps_high))",
            _POS,
            "MiniMax 2025 (MiniMax-M1)",
        ),
        Form(
            "seq_clip",
            (1, 2),
            ("eps_low", "eps_high"),
            "GSPO's clip on the length-normalised sequence ratio s = (π_θ(y)/π_old(y))^(1/|y|)",
            "𝟙[Â>0 ⇒ s ≤ 1+eps_high; Â<0 ⇒ s ≥ 1−eps_low]",
            _EPS,
            "Zheng et al. 2025 (GSPO)",
        ),
    ),
    "denom": _forms(
        Form("pi_theta", meaning="the current policy: ∇π_θ/π_θ = ∇log π_θ", formula="1/π_θ"),
        Form(
            "pi_old",
            meaning="the policy that sampled the rollouts (importance ratio r = π_θ/π_old)",
            formula="1/π_old",
        ),
        Form(
            "pi_old_seq",
            meaning="GSPO's sequence-level ratio s = (π_θ(y)/π_old(y))^(1/|y|), applied to every token",
            formula="s/π_θ",
        ),
        Form(
            "1", meaning="no denominator: the gradient of π_θ itself (off-policy demonstrations)", formula="1"
        ),
    ),
    "adv": _forms(
        Form("const", (1,), ("c",), "a constant advantage (SFT is const(1))", "Â = c", _FINITE),
        Form("reward", meaning="the raw reward of the sequence", formula="Â = R"),
        Form(
            "group_norm",
            meaning="reward standardised within its group",
            formula="Â = (R − mean_G R) / std_G R",
        ),
        Form("group_mean", meaning="reward minus its group mean (Dr. GRPO)", formula="Â = R − mean_G R"),
        Form(
            "pm_one",
            meaning="+1 for a correct response (R > 0.5), −1 otherwise (SRFT's ±1 reward)",
            formula="Â = +1 if R > 0.5 else −1",
            source="Fu et al. 2025 (SRFT)",
        ),
        Form(
            "rloo",
            meaning="reward minus the mean of the other n−1 in its group",
            formula="Â = R − mean_{G∖i} R",
        ),
        Form(
            "batch_norm",
            meaning="reward standardised over the whole batch (REINFORCE++)",
            formula="Â = (R − mean_B R) / std_B R",
        ),
        Form(
            "token_whiten",
            meaning="token returns (γ = 1) whitened over every response token of the step (REINFORCE++)",
            formula="Â = (R − mean_tok R) / sqrt(var_tok R + 1e-8)",
            source="Hu 2025 (REINFORCE++), as verl computes it",
        ),
        Form(
            "gae",
            (2, 3),
            ("gamma", "lambda", "whiten"),
            "generalised advantage estimation over a critic's values, whitened over the step's "
            "response tokens (whiten = 1, the default; 0 switches it off)",
            "Â_t = Σ_l (γλ)^l δ_{t+l},  δ_t = R_t + γV_{t+1} − V_t",
            _gae_args,
            "Schulman et al. 2016 (GAE); whitening as verl, OpenRLHF and TRL",
        ),
    ),
    "grad": _forms(
        Form("loglik", meaning="the likelihood gradient ∇π_θ", formula="∇π_θ"),
        Form(
            "shaped",
            (1,),
            ("gamma",),
            "policy shaping: the ratio x is replaced by f(x) = x/(x+γ), lifting low-probability tokens",
            "∇f(x), f(x) = x/(x+γ)",
            _POS,
            "Yan et al. 2025 (LUFFY)",
        ),
    ),
    "agg": _forms(
        Form(
            "token_mean",
            meaning="mean over every response token of the mini-batch",
            formula="(1/Σ_i|y_i|) Σ_i Σ_t",
        ),
        Form(
            "seq_mean_token_mean",
            meaning="mean over tokens within a sequence, then over sequences",
            formula="(1/B) Σ_i (1/|y_i|) Σ_t",
        ),
        Form(
            "seq_mean_token_sum",
            meaning="sum over tokens within a sequence, mean over sequences",
            formula="(1/B) Σ_i Σ_t",
        ),
        Form(
            "token_sum",
            (0, 1),
            ("L",),
            "sum over every token divided by a constant L, not by a row or token count "
            "(default: rollout.max_new_tokens; the released HPT and LUFFY scripts)",
            "(1/L) Σ_i Σ_t",
            _POS,
            "HPT / LUFFY released scripts (loss_remove_token_mean)",
        ),
        Form(
            "token_sum_norm",
            (0, 1),
            ("L",),
            "sum over tokens divided by a constant length L (default: rollout.max_new_tokens)",
            "(1/(B·L)) Σ_i Σ_t",
            _POS,
            "Liu et al. 2025 (Dr. GRPO)",
        ),
    ),
    "on": _forms(
        Form("rollouts", meaning="the policy's own sampled responses"),
        Form("demos", meaning="the demonstrations (reference solutions)"),
        Form("rollouts+demos", meaning="both"),
    ),
    "group": _forms(
        Form("rollouts", meaning="a question's n rollouts form its advantage group"),
        Form("rollouts+demos", meaning="a question's rollouts and its demonstration form one group"),
    ),
    "kl": _forms(
        Form("none", meaning="no KL penalty"),
        Form(
            "k1",
            (1,),
            ("coef",),
            "KL penalty, estimator k1 = log(π_θ/π_ref)",
            "+ coef·k1",
            _NONNEG,
            "Schulman 2020",
        ),
        Form(
            "k2",
            (1,),
            ("coef",),
            "KL penalty, estimator k2 = ½ log²(π_θ/π_ref)",
            "+ coef·k2",
            _NONNEG,
            "Schulman 2020",
        ),
        Form(
            "k3",
            (1,),
            ("coef",),
            "KL penalty, estimator k3 = π_ref/π_θ − log(π_ref/π_θ) − 1",
            "+ coef·k3",
            _NONNEG,
            "Schulman 2020",
        ),
    ),
    "entropy": {},  # a number: the entropy bonus coefficient
    "ent_weight": _forms(
        Form("none", meaning="no entropy-aware weight"),
        Form(
            "exp",
            (1, 2),
            ("s", "c"),
            "every row's objective weighted by c·sg(exp(s·H̄)), H̄ the row's mean token entropy",
            "· c·sg(exp(s·H̄_i))",
            _FINITE,
            "Fu et al. 2025 (SRFT: exp(−H) on demonstrations)",
        ),
        Form(
            "pos_exp",
            (1, 2),
            ("s", "c"),
            "rows with Â > 0 weighted by c·sg(exp(s·H̄)), H̄ the row's mean token entropy; others by 1",
            "· (Â>0 ? c·sg(exp(s·H̄_i)) : 1)",
            _FINITE,
            "Fu et al. 2025 (SRFT: 0.1·exp(H) on positive rollouts)",
        ),
    ),
}

KEYS: tuple[str, ...] = tuple(VOCAB)

KEY_MEANING: dict[str, str] = {
    "mask": "stabilisation mask 1_stable",
    "denom": "reference-policy denominator π_ref (not the KL reference model)",
    "adv": "advantage estimate Â",
    "grad": "likelihood gradient",
    "agg": "how token losses are aggregated over the mini-batch",
    "on": "rows whose tokens carry this loss",
    "group": "rows pooled for group advantages",
    "kl": "KL penalty to the frozen reference model",
    "entropy": "entropy bonus coefficient",
    "ent_weight": "entropy-aware weight of each row's objective",
}

KIND_NAME: dict[str, str] = {
    "mask": "mask",
    "denom": "denominator",
    "adv": "advantage",
    "grad": "likelihood gradient",
    "agg": "aggregation",
    "on": "row set",
    "group": "group",
    "kl": "KL estimator",
    "entropy": "entropy coefficient",
    "ent_weight": "entropy-aware weight",
}

CLIP_MASKS = ("clip", "dual_clip", "cispo", "seq_clip")


def show(value: object) -> str:
    """A component value as a user would write it: ``clip(0.2)`` rather than the
    normalised ``clip(0.2, 0.2)``."""
    if isinstance(value, Call):
        args = value.args
        if value.name in ("clip", "seq_clip") and len(args) == 2 and args[0] == args[1]:
            return str(Call(value.name, args[:1]))
        if value.name == "dual_clip" and len(args) == 3 and args[0] == args[1]:
            return str(Call(value.name, (args[0], args[2])))
    return "none" if value is None else str(value)


