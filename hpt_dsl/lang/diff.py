"""Two checked recipes compared: the data behind ``hpt-dsl diff``.

Estimators are paired by name where both recipes have it, the rest in order. For each
pair: every component, the per-token gradient, the aggregation and the normaliser, side by
side with a flag where they differ; then every setting whose value differs.
"""

from __future__ import annotations

from typing import Any

from hpt_dsl.lang.components import show
from hpt_dsl.lang.explain import formula, match_recipe, normalisers, show_loss
from hpt_dsl.lang.plugins import vocabulary
from hpt_dsl.recipe import EstimatorSpec, Recipe

KEYS = ("mask", "denom", "adv", "grad", "agg", "on", "group", "kl", "entropy", "ent_weight")


def diff(a: Recipe, b: Recipe) -> dict[str, Any]:
    """{'loss': (a, b), 'algorithm': (a, b), 'estimators': [...], 'settings': [...]}."""
    return {
        "loss": (show_loss(a.loss), show_loss(b.loss)),
        "algorithm": (match_recipe(a)["algorithm"], match_recipe(b)["algorithm"]),
        "estimators": [_pair(a, b, x, y) for x, y in _pairs(a, b)],
        "settings": _settings(a, b),
    }


def _pairs(a: Recipe, b: Recipe) -> list[tuple[str | None, str | None]]:
    common = [n for n in a.estimators if n in b.estimators]
    rest_a = [n for n in a.estimators if n not in common]
    rest_b = [n for n in b.estimators if n not in common]
    pairs: list[tuple[str | None, str | None]] = [(n, n) for n in common]
    for i in range(max(len(rest_a), len(rest_b))):
        pairs.append((rest_a[i] if i < len(rest_a) else None, rest_b[i] if i < len(rest_b) else None))
    return pairs


def _pair(a: Recipe, b: Recipe, x: str | None, y: str | None) -> dict[str, Any]:
    sides = [_describe(r, n) for r, n in ((a, x), (b, y))]
    rows = [
        {"key": key, "a": sides[0].get(key, "—"), "b": sides[1].get(key, "—"),
         "differs": sides[0].get(key, "—") != sides[1].get(key, "—")}
        for key in (*KEYS, "gradient", "aggregate", "normaliser")
    ]  # fmt: skip
    return {"a": x, "b": y, "rows": rows}


def _describe(recipe: Recipe, name: str | None) -> dict[str, str]:
    if name is None:
        return {}
    spec: EstimatorSpec = recipe.estimators[name]
    vocab, _ = vocabulary(recipe.plugins)
    out = {key: show(getattr(spec, key)) for key in KEYS}
    out["entropy"] = f"{spec.entropy:g}"
    f = formula(spec, vocab)
    out["gradient"] = f["gradient"]
    out["aggregate"] = f["aggregate"]
    norms = [n["formula"] for n in normalisers(recipe.loss) if n["term"] == name]
    out["normaliser"] = norms[0] if norms else "—"
    return out


def _settings(a: Recipe, b: Recipe) -> list[dict[str, str]]:
    fa, fb = _flat(a.settings.model_dump()), _flat(b.settings.model_dump())
    keys = sorted(set(fa) | set(fb))
    return [{"key": k, "a": str(fa.get(k, "—")), "b": str(fb.get(k, "—"))} for k in keys if fa.get(k) != fb.get(k)]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out
