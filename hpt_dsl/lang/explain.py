"""What a checked recipe means, in words and formulas: the data behind ``hpt-dsl explain``.

For each estimator: its components with their meaning, the per-token gradient of the
unified estimator

    ∇ℓ_t = 𝟙_stable · (1/π_ref) · Â · ∇π_θ(y_t)

with every part substituted, and the published algorithm it matches (compared by
components with the prelude). For the recipe: the algorithm of the whole loss (HPT is
a per-question gate choosing an RL estimator or sft), what the run needs, and the gate.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from hpt_dsl.lang.components import KEY_MEANING, VOCAB, show
from hpt_dsl.lang.load import prelude_estimators
from hpt_dsl.lang.plugins import vocabulary
from hpt_dsl.recipe import (
    STATS,
    Arith,
    BoolOp,
    Compare,
    EstimatorSpec,
    Gate,
    Joint,
    LossExpr,
    Neg,
    Not,
    PerQuestion,
    Recipe,
    Scale,
    Stat,
    Sum,
    Term,
    Zero,
    num,
    scoped_terms,
    show_cond,
    show_scalar,
)
from hpt_dsl.settings import Settings

PAPERS: dict[str, str] = {
    "sft": "supervised fine-tuning",
    "reinforce": "REINFORCE (Williams 1992)",
    "ppo": "PPO with GAE (Schulman et al. 2017)",
    "grpo": "GRPO (Shao et al. 2024)",
    "dr_grpo": "Dr. GRPO (Liu et al. 2025)",
    "dapo": "DAPO (Yu et al. 2025)",
    "cispo": "CISPO (MiniMax 2025)",
    "gspo": "GSPO (Zheng et al. 2025)",
    "rloo": "RLOO (Ahmadian et al. 2024)",
    "reinforce_pp": "REINFORCE++ (Hu 2025)",
    "luffy_on": "LUFFY, on-policy part (Yan et al. 2025)",
    "luffy_off": "LUFFY, off-policy part (Yan et al. 2025)",
    "luffy": "LUFFY (Yan et al. 2025), as the paper writes it: clip, std, one token mean over on- and off-policy",
    "luffy_code": "LUFFY (Yan et al. 2025), as its released scripts run it: no std, no clip, token sum / "
    "max_new_tokens, entropy bonus 0.001",
    "srft_off": "SRFT, off-policy part (Fu et al. 2025)",
    "srft": "SRFT (Fu et al. 2025), as the paper writes it: entropy-weighted SFT, off-policy and on-policy terms",
    "srft_offline": "SRFT's off-policy form: LUFFY's on-policy part and the unshaped demonstration",
    "hpt": "Hybrid Post-Training (Lv et al. 2025)",
    "hpt_grpo": "Hybrid Post-Training (Lv et al. 2025) with each branch averaged over its own rows: GRPO on "
    "the solved questions' rollouts, SFT on the others' demonstrations (not the paper's per-question loss)",
    "hpt_code": "Hybrid Post-Training (Lv et al. 2025), as the authors' released script runs it: no std, no "
    "clip, token sum / max_new_tokens, SFT token mean, entropy bonus 0.001",
}

EXACT: dict[str, str] = {
    "hpt": "Hybrid Post-Training (Lv et al. 2025), as the paper writes it (Eq. 10-13): per question, the "
    "clipped GRPO surrogate summed over each rollout's tokens and averaged over its n rollouts when the "
    "pass rate is above gamma, the token mean of SFT on its demonstration otherwise; each question weighs 1/Q",
}
"""Descriptions of the prelude's losses when a recipe is exactly one of them."""

FIELDS = ("mask", "clip_symmetric", "denom", "adv", "grad", "agg", "on", "group", "entropy", "ent_weight")
WEIGHTS = (3, 1, 3, 3, 2, 1, 3, 1, 1, 2)
"""How much a difference in each field counts when looking for the closest algorithm."""
PER_QUESTION = set(STATS) - {"step"}


# ----- matching -------------------------------------------------------------------------------


def signature(s: EstimatorSpec) -> tuple[object, ...]:
    """What identifies an algorithm: component kinds, not their hyper-parameters (a GRPO
    with clip 0.3 is still GRPO); a clip's symmetry tells GRPO from DAPO."""
    symmetric = s.mask.args[0] == s.mask.args[1] if s.mask.name == "clip" else None
    weight = None if s.ent_weight is None else s.ent_weight.name
    return (s.mask.name, symmetric, s.denom, s.adv.name, s.grad.name, s.agg.name, s.on, s.group, bool(s.entropy),
            weight)  # fmt: skip


def match_estimator(s: EstimatorSpec, settings: Settings | None = None) -> dict[str, Any]:
    """{'name': exact prelude match or None, 'closest': name, 'differs': [field, ...]}."""
    best: tuple[int, str, list[str]] | None = None
    sig = signature(s)
    for name, loss in prelude_estimators(settings).items():
        if not isinstance(loss, Term):
            continue
        other = signature(loss.estimator)
        diff = [(f, w) for f, w, a, b in zip(FIELDS, WEIGHTS, sig, other, strict=True) if a != b]
        cost = sum(w for _, w in diff)
        if best is None or cost < best[0]:
            best = (cost, name, [f for f, _ in diff])
    assert best is not None
    cost, name, differs = best
    return {"name": name if cost == 0 else None, "closest": name, "differs": differs}


def match_recipe(recipe: Recipe) -> dict[str, Any]:
    """{'algorithm': short name or None, 'description': one line}."""
    loss = recipe.loss
    if isinstance(loss, Term):
        m = match_estimator(loss.estimator, recipe.settings)
        if m["name"]:
            return {"algorithm": m["name"], "description": PAPERS.get(m["name"], m["name"])}
        return {
            "algorithm": None,
            "description": f"a custom estimator, closest to {m['closest']} "
            f"(differs in {', '.join(m['differs'])})",
        }
    shape = _shape(loss, recipe.settings)
    for name, other in prelude_estimators(recipe.settings).items():
        if not isinstance(other, Term) and _shape(other, recipe.settings) == shape:
            return {"algorithm": name, "description": EXACT.get(name, PAPERS.get(name, name))}
    if isinstance(loss, PerQuestion) and isinstance(loss.loss, Gate):
        m = _match_gate(loss.loss, recipe.settings)
        return {**m, "description": m["description"] + "; a loss per question, each weighing 1/Q"}
    if isinstance(loss, Gate):
        return _match_gate(loss, recipe.settings)
    if isinstance(loss, Zero):
        return {"algorithm": None, "description": "the empty loss: nothing is learned"}
    if isinstance(loss, Sum) and any(isinstance(i, Scale) and _stats(i.coef) for i in loss.items):
        soft = "a soft gate: estimators weighted by per-question statistics"
        return {"algorithm": None, "description": soft}
    return {"algorithm": None, "description": "a weighted combination of estimators"}


def _match_gate(g: Gate, settings: Settings) -> dict[str, Any]:
    stats = set().union(*(_stats(c) for c, _ in g.branches))
    if len(g.branches) != 1:
        return {"algorithm": None, "description": "a gate with several branches"}
    cond, then = g.branches[0]
    first, second = _name_of(then, settings), _name_of(g.orelse, settings)
    if stats == {"step"}:
        return {
            "algorithm": f"{first}_then_{second}" if first and second else None,
            "description": f"a schedule: {first or 'one loss'} while {show_cond(cond)}, "
            f"then {second or 'another'}",
        }
    if stats and stats <= PER_QUESTION and _is_rl(then, settings):
        rl = first or "RL"
        if second == "sft":
            return {
                "algorithm": "hpt",
                "description": f"{PAPERS['hpt']}: {rl} on questions where "
                f"{show_cond(cond)}, SFT on the demonstration otherwise",
            }
        if second in ("luffy_off", "srft_off"):
            return {
                "algorithm": "hpt_off_on",
                "description": f"HPT ablation Off/ON: {rl} where {show_cond(cond)}, "
                f"the off-policy {second} on the demonstration otherwise",
            }
        if second is None and _has_sft(g.orelse, settings):
            return {
                "algorithm": "hpt_mix_on",
                "description": f"HPT ablation Mix/ON: {rl} where "
                f"{show_cond(cond)}, a mix of SFT and off-policy learning on the demonstration otherwise",
            }
    return {
        "algorithm": None,
        "description": f"a per-question gate on {', '.join(sorted(stats)) or 'constants'}",
    }


def _name_of(loss: LossExpr, settings: Settings) -> str | None:
    if isinstance(loss, Term):
        return match_estimator(loss.estimator, settings)["name"]
    return None


def _is_rl(loss: LossExpr, settings: Settings) -> bool:
    return isinstance(loss, Term) and "rollouts" in loss.estimator.on


def _has_sft(loss: LossExpr, settings: Settings) -> bool:
    stack = [loss]
    while stack:
        node = stack.pop()
        if isinstance(node, Term) and _name_of(node, settings) == "sft":
            return True
        if isinstance(node, Scale):
            stack.append(node.loss)
        elif isinstance(node, Sum):
            stack.extend(node.items)
    return False


def _shape(loss: LossExpr, settings: Settings) -> object:
    """A loss tree reduced to estimator signatures; sums compare as multisets."""
    if isinstance(loss, Joint | PerQuestion):
        return (type(loss).__name__, _shape(loss.loss, settings))
    if isinstance(loss, Term):
        return ("term", signature(loss.estimator))
    if isinstance(loss, Scale):
        return ("scale", loss.coef, _shape(loss.loss, settings))
    if isinstance(loss, Sum):
        return ("sum", tuple(sorted((_shape(i, settings) for i in loss.items), key=repr)))
    if isinstance(loss, Gate):
        return (
            "gate",
            tuple((c, _shape(b, settings)) for c, b in loss.branches),
            _shape(loss.orelse, settings),
        )
    return ("zero",)


def _stats(x: object) -> set[str]:
    if isinstance(x, Stat):
        return {x.name}
    if isinstance(x, Arith | Compare):
        return _stats(x.left) | _stats(x.right)
    if isinstance(x, Neg | Not):
        return _stats(x.operand)
    if isinstance(x, BoolOp):
        return set().union(*(_stats(i) for i in x.items))
    return set()


# ----- printing ---------------------------------------------------------------------------------


def show_loss(loss: LossExpr) -> str:
    if isinstance(loss, Term):
        return loss.estimator.name or "estimator"
    if isinstance(loss, Zero):
        return "0"
    if isinstance(loss, Scale):
        inner = show_loss(loss.loss)
        if isinstance(loss.loss, Sum | Gate):
            inner = f"({inner})"
        return f"{show_scalar(loss.coef, 2)} * {inner}"
    if isinstance(loss, Sum):
        return " + ".join(f"({show_loss(i)})" if isinstance(i, Gate) else show_loss(i) for i in loss.items)
    if isinstance(loss, Gate):
        parts = [f"if {show_cond(c)} then {show_loss(b)}" for c, b in loss.branches]
        return " el".join(parts) + f" else {show_loss(loss.orelse)}"
    if isinstance(loss, Joint):
        return f"joint({show_loss(loss.loss)})"
    if isinstance(loss, PerQuestion):
        return f"per_question({show_loss(loss.loss)})"
    return "?"


def gate_rows(loss: LossExpr) -> list[dict[str, str]]:
    """The outermost gate as rows (condition, loss); [] when the loss has no gate."""
    while isinstance(loss, Scale | Joint | PerQuestion):
        loss = loss.loss
    if not isinstance(loss, Gate):
        return []
    rows = [{"when": show_cond(c), "loss": show_loss(b)} for c, b in loss.branches]
    rows.append({"when": "otherwise", "loss": show_loss(loss.orelse)})
    return rows


# ----- formulas -----------------------------------------------------------------------------------

_ADV = {
    "reward": "R",
    "group_norm": "(R − mean_G R)/std_G R",
    "group_mean": "(R − mean_G R)",
    "rloo": "(R − mean_{G∖i} R)",
    "batch_norm": "(R − mean_B R)/std_B R",
    "token_whiten": "(R − mean_tok R)/sqrt(var_tok R + 1e-8)",
    "pm_one": "(R > 0.5 ? +1 : −1)",
}


def formula(s: EstimatorSpec, vocab: dict[str, dict[str, Any]] = VOCAB) -> dict[str, str]:
    """The per-token gradient and the definitions it uses."""
    m, a = s.mask, s.mask.args
    ratio = "s" if s.denom == "pi_old_seq" else "r"
    factors: list[str] = []
    where: list[str] = []
    if m.name in ("clip", "seq_clip"):
        factors.append(f"𝟙[Â>0 ⇒ {ratio} ≤ {num(1 + a[1])}; Â<0 ⇒ {ratio} ≥ {num(1 - a[0])}]")
    elif m.name == "dual_clip":
        factors.append(f"𝟙[Â>0 ⇒ r ≤ {num(1 + a[1])}; Â<0 ⇒ {num(1 - a[0])} ≤ r ≤ {num(a[2])}]")
    elif m.name == "cispo":
        factors.append(f"sg(min(r, {num(1 + a[0])}))")
    elif m.name != "none":  # a plugin's mask: its declared formula
        form = vocab["mask"][m.name]
        factors.append((form.formula or f"𝟙_{m.name}") + (f" ({', '.join(num(x) for x in a)})" if a else ""))
    pi_ref = {"pi_theta": "π_θ", "pi_old": "π_old", "pi_old_seq": "π_θ", "1": "1"}.get(s.denom, f"π_ref[{s.denom}]")
    if m.name == "cispo":
        pi_ref = "π_θ"
    if s.grad.name == "shaped":
        g = num(s.grad.args[0])
        x = "π_θ" if pi_ref == "1" else f"π_θ/{pi_ref}"
        factors.append(f"{g}/({x} + {g})²")
        where.append(f"shaping f(x) = x/(x + {g}) of x = {x}: ∇f(x) = {g}/(x + {g})² ∇x")
    if s.denom == "pi_old_seq":
        factors.append("(s/π_θ)")
    elif pi_ref != "1":
        factors.append(f"(1/{pi_ref})")
    factors.append(_adv_text(s, vocab))
    factors.append("∇π_θ(y_t)")
    if ratio == "r" and (m.name in ("clip", "dual_clip", "cispo") or s.denom == "pi_old"):
        where.append("r = π_θ(y_t)/π_old(y_t)")
    if ratio == "s":
        where.append("s = (π_θ(y)/π_old(y))^(1/|y|), the length-normalised sequence ratio")
    if s.adv.name in ("group_norm", "group_mean", "rloo"):
        members = "rollouts and demonstration" if s.group == "rollouts+demos" else "rollouts"
        where.append(f"G = the {members} of the same question")
    if s.adv.name == "gae":
        where.append(VOCAB["adv"]["gae"].formula + f", γ = {num(s.adv.args[0])}, λ = {num(s.adv.args[1])}")
    out = {"gradient": "∇ℓ_t = " + " · ".join(factors), "where": "; ".join(where)}
    agg = vocab["agg"][s.agg.name]
    out["aggregate"] = agg.formula + (f", L = {num(s.agg.args[0])}" if s.agg.args else "")
    regs = []
    if s.kl is not None:
        regs.append(f"+ {num(s.kl.args[0])} · ∇{s.kl.name}(π_θ ‖ π_ref-model)")
    if s.entropy:
        regs.append(f"− {num(s.entropy)} · ∇H(π_θ)")
    if s.ent_weight is not None:
        e, c = s.ent_weight.args
        weight = f"{num(c)}·sg(exp({num(e)}·H̄_i))"
        factors.insert(0, weight if s.ent_weight.name == "exp" else f"(Â>0 ? {weight} : 1)")
        out["gradient"] = "∇ℓ_t = " + " · ".join(factors)
        out["where"] = "; ".join([*where, "H̄_i = the mean token entropy of response i"])
    out["regularizers"] = " ".join(regs)
    return out


def _adv_text(s: EstimatorSpec, vocab: dict[str, dict[str, Any]] = VOCAB) -> str:
    if s.adv.name == "const":
        return num(s.adv.args[0])
    if s.adv.name == "gae":
        return "Â_GAE"
    if s.adv.name in _ADV:
        return _ADV[s.adv.name]
    text = vocab["adv"][s.adv.name].formula.removeprefix("Â = ")  # a plugin's advantage
    return f"({text})" if text else f"Â_{s.adv.name}"


# ----- normalisers ---------------------------------------------------------------------------------

_ROWS = {"rollouts": "rollout", "demos": "demonstration", "rollouts+demos": "rollout and demonstration"}
_COUNT = {
    "token_mean": ("(1/N_tokens({S})) Σ_i Σ_t", "Σ over {s} tokens / the number of {s} tokens"),
    "seq_mean_token_mean": (
        "(1/N_seqs({S})) Σ_i (1/|y_i|) Σ_t",
        "each response's token mean, averaged over {s} responses",
    ),
    "seq_mean_token_sum": ("(1/N_seqs({S})) Σ_i Σ_t", "each response's token sum, averaged over {s} responses"),
    "token_sum_norm": ("(1/(L·N_seqs({S}))) Σ_i Σ_t", "Σ over {s} tokens / (L × the number of {s} responses)"),
    "token_sum": ("(1/L) Σ_i Σ_t", "Σ over {s} tokens / L, not by any count"),
}


def normalisers(loss: LossExpr) -> list[dict[str, str]]:
    """Each term's normaliser, in words and as a formula: over whose tokens its counts are
    taken (its own rows, or the union of a ``joint`` group's) and, under ``per_question``,
    per question then averaged over the Q questions of the mini-batch."""
    found = [(term.estimator, scope.joint, scope.per_question) for term, scope in scoped_terms(loss)]
    out = []
    for spec, joint, pq in found:
        members = [s for s, j, _ in found if joint is not None and j == joint]
        rows = {s.on for s in members} or {spec.on}
        union = "rollouts+demos" if len(rows) > 1 or "rollouts+demos" in rows else rows.pop()
        formula_text, words = _COUNT.get(spec.agg.name, ("a_i(L_i, N_tokens({S}), N_seqs({S})) Σ_i Σ_t",
                                                         "{s} tokens weighted by a plugin aggregation"))
        label = {"rollouts": "rollouts", "demos": "demos", "rollouts+demos": "rollouts+demos"}[union]
        scope = "all" if joint is not None and len(members) > 1 else label
        f = formula_text.format(S=scope + (", q" if pq else ""))
        w = words.format(s=("the question's " if pq else "") + _ROWS[union])
        if spec.agg.args:
            f += f", L = {num(spec.agg.args[0])}"
        if joint is not None and len(members) > 1:
            names = ", ".join(dict.fromkeys(m.name or "estimator" for m in members))
            w += f" (one normaliser shared by {names})"
        if pq:
            f = f"(1/Q) Σ_q {f}"
            w = f"per question: {w}; then the mean over the Q questions of the mini-batch (each weighs 1/Q)"
        out.append({"term": spec.name or "estimator", "formula": f, "words": w})
    return out


# ----- everything, as plain data ------------------------------------------------------------------


def explain(recipe: Recipe) -> dict[str, Any]:
    """All that ``hpt-dsl explain`` prints, JSON-ready."""
    vocab, _ = vocabulary(recipe.plugins)
    estimators = []
    for name, s in recipe.estimators.items():
        comps = {k: show(getattr(s, k)) for k in ("mask", "denom", "adv", "grad", "agg", "on", "group", "kl")}
        comps["entropy"] = num(s.entropy)
        if s.ent_weight is not None:
            comps["ent_weight"] = show(s.ent_weight)
        estimators.append(
            {
                "name": name,
                "components": comps,
                "meaning": {k: _meaning(k, s, vocab) for k in comps},
                "formula": formula(s, vocab),
                "match": match_estimator(s, recipe.settings),
            }
        )
    return {
        "path": recipe.path,
        "loss": show_loss(recipe.loss),
        **match_recipe(recipe),
        "estimators": estimators,
        "needs": asdict(recipe.needs),
        "gate": gate_rows(recipe.loss),
        "normalisers": normalisers(recipe.loss),
        "plugins": [p.summary() for p in recipe.plugins],
        "warnings": [d.to_dict() for d in recipe.warnings],
    }


def _meaning(key: str, s: EstimatorSpec, vocab: dict[str, dict[str, Any]] = VOCAB) -> str:
    if key == "entropy":
        return KEY_MEANING["entropy"]
    if key == "ent_weight":
        return vocab["ent_weight"][s.ent_weight.name].meaning if s.ent_weight else KEY_MEANING[key]
    value = getattr(s, key)
    name = "none" if value is None else value.name if hasattr(value, "name") else str(value)
    form = vocab[key].get(name)
    return form.meaning if form is not None else KEY_MEANING[key]
