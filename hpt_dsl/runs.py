"""Reading run folders: the per-step metrics, the evaluations, the run's name and seed.

A run folder (written by ``hpt-dsl run``) holds ``metrics.jsonl``: one JSON object per
line, each with a ``step``. Training lines carry the step's metrics; evaluation results
are lines whose keys start with ``eval/`` (or a separate ``eval.jsonl``). Metric names are
looked up through ``ALIASES`` so that the figures and tables name one thing one way.

Nothing here imports torch; reading a run takes milliseconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpt_dsl.errors import InputError

ALIASES: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean", "reward", "rollout/reward"),
    "entropy": ("entropy", "rollout/entropy"),
    "response_length": ("response_length", "response_len", "rollout/response_length"),
    "tokens_per_s": ("tokens_per_s", "perf/tokens_per_s", "throughput/tokens_per_s"),
    "time": ("time", "wall_s", "elapsed_s", "time/total"),
}
"""Canonical metric name -> the keys it may be written under, first match wins."""

EVAL_ACC = ("avg@1", "acc", "accuracy", "pass@1")
"""Keys of an evaluation summary read as its held-out accuracy, first match wins
(avg@k is found by prefix when k > 1)."""


class RunError(InputError):
    """A run folder that cannot be read; the message names the file and the fix."""


@dataclass
class RunData:
    """One run: its folder, label (recipe name), seed, metric lines and evaluations."""

    path: Path
    label: str
    seed: int | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path`` (a torn last line, from a run killed
    mid-write, is ignored)."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise RunError(f"{path}:{i}: not a JSON line ({e.msg}); the metrics file is damaged") from None
        if isinstance(row, dict):
            out.append(row)
    return out


def _label_from_folder(name: str) -> str:
    """``hpt-20261128-213000`` -> ``hpt``; ``grpo-seed1`` -> ``grpo``."""
    name = re.sub(r"-\d{8}-\d{6}$", "", name)
    return re.sub(r"-seed\d+$", "", name)


def load_run(path: Path, label: str | None = None) -> RunData:
    """Read a run folder; raises ``RunError`` when it has no metrics."""
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder; pass a folder written by 'hpt-dsl run'")
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise RunError(f"{path}: no metrics.jsonl; is this a run folder written by 'hpt-dsl run'?")
    rows = read_jsonl(metrics)
    steps, evals = [], []
    for row in rows:
        ev = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
        if ev:
            evals.append({"step": row.get("step"), **ev})
        train = {k: v for k, v in row.items() if not k.startswith("eval/")}
        if len(train) > 1 and row.get("kind", "train") == "train":
            steps.append(train)
    extra = path / "eval.jsonl"
    if extra.exists():
        evals += read_jsonl(extra)
    evals.sort(key=lambda e: e.get("step") or 0)
    info = _read_info(path)
    final = path / "pass_at_k.json"
    if final.exists():
        try:
            info["pass_at_k"] = json.loads(final.read_text(encoding="utf-8"))
        except ValueError:
            pass
    seed = info.get("seed")
    name = label or info.get("label") or _label_from_folder(path.name)
    return RunData(path, str(name), seed if isinstance(seed, int) else None, steps, evals, info)


def _read_info(path: Path) -> dict[str, Any]:
    """Name and seed of the run from its resolved settings when it wrote them."""
    for name in ("run.json",):
        f = path / name
        if f.exists():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                seed = data.get("seed", data.get("settings", {}).get("train", {}).get("seed"))
                label = data.get("label") or data.get("recipe_name") or data.get("name")
                keep = {k: data[k] for k in ("completed", "wall_s") if k in data}
                needs = data.get("needs")
                rollouts = needs.get("rollouts", True) if isinstance(needs, dict) else True
                return {"seed": seed, "label": label, "rollouts": bool(rollouts), **keep}
    return {}


# ----- series -------------------------------------------------------------------------------


def lookup(row: dict[str, Any], name: str) -> float | None:
    """The value of canonical metric ``name`` in one metrics line, or None."""
    for key in ALIASES.get(name, (name,)):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


ROLLOUT_METRICS = ("reward", "entropy", "response_length", "tokens_per_s")
"""Metrics of the sampled responses: none for a run that samples none (pure SFT)."""


def step_series(run: RunData, name: str) -> dict[float, float]:
    """{step: value} of metric ``name`` over the run's training lines."""
    if name in ROLLOUT_METRICS and run.info.get("rollouts") is False:
        return {}
    out = {}
    for row in run.steps:
        v = lookup(row, name)
        if v is not None and "step" in row:
            out[float(row["step"])] = v
    return out


def eval_acc(ev: dict[str, Any]) -> float | None:
    """The held-out accuracy of one evaluation summary (avg@k, else pass@1)."""
    for key in EVAL_ACC:
        v = ev.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    for key, v in ev.items():
        if key.startswith("avg@") and isinstance(v, (int, float)):
            return float(v)
    return None


def eval_accuracy(run: RunData) -> dict[float, float]:
    """{step: held-out accuracy} over the run's evaluations."""
    out = {}
    for ev in run.evals:
        acc = eval_acc(ev)
        if acc is not None and ev.get("step") is not None:
            out[float(ev["step"])] = acc
    return out


def final_pass_at_k(run: RunData) -> dict[int, float]:
    """{k: pass@k} of the final model: its separate evaluation with many samples
    (``pass_at_k.json``, written by ``compare --pass-k``) when there is one, else the run's
    last evaluation (empty when it has none)."""
    if isinstance(run.info.get("pass_at_k"), dict):
        last = run.info["pass_at_k"]
    elif run.evals:
        last = run.evals[-1]
    else:
        return {}
    out = {}
    for key, v in last.items():
        m = re.fullmatch(r"pass@(\d+)", key)
        if m and isinstance(v, (int, float)):
            out[int(m.group(1))] = float(v)
    return dict(sorted(out.items()))


def _prefixed(run: RunData, prefix: str) -> dict[str, dict[float, float]]:
    """{name: {step: value}} of the one-level keys ``<prefix>/<name>`` of the training lines
    (deeper keys such as ``gate/<term>/nonfinite`` are diagnostics)."""
    out: dict[str, dict[float, float]] = {}
    for row in run.steps:
        if "step" not in row:
            continue
        for k, v in row.items():
            if k.startswith(prefix + "/") and k.count("/") == 1 and isinstance(v, (int, float)):
                out.setdefault(k[len(prefix) + 1 :], {})[float(row["step"])] = float(v)
    return out


def gate_shares(runs: list[RunData]) -> tuple[list[float], dict[str, list[float]]]:
    """(steps, {branch: share of questions, mean over runs}) of a gated recipe.

    The branches are the ``branch/<condition>`` keys (shares that sum to 1 per step). A
    branch is named ``<condition>: <term>`` when its share equals the share of questions
    one loss term (``gate/<term>``) trains, at every step of every run. Empty when the
    recipe has no gate (a plain sum of terms trains every question on every term)."""
    per_run = [(_prefixed(r, "branch"), _prefixed(r, "gate")) for r in runs]
    per_run = [(b, g) for b, g in per_run if len(b) > 1]
    if not per_run:
        return [], {}
    branches = list(per_run[0][0])
    steps = sorted(set.intersection(*(set(s) for b, _ in per_run for s in b.values())))
    n = len(per_run)
    shares: dict[str, list[float]] = {}
    for name in branches:
        same = [t for t in per_run[0][1] if all(b.get(name) == g.get(t) for b, g in per_run)]
        label = f"{name}: {same[0]}" if len(same) == 1 else name
        shares[label] = [sum(b.get(name, {}).get(s, 0.0) for b, _ in per_run) / n for s in steps]
    return steps, shares


def loss_terms(run: RunData) -> list[str]:
    """The loss keys of a run: ``loss`` and every ``loss/<term>``, in first-seen order."""
    seen: dict[str, None] = {}
    for row in run.steps:
        for k, v in row.items():
            if (k == "loss" or (k.startswith("loss/") and k.count("/") == 1)) and isinstance(v, (int, float)):
                seen[k] = None
    return list(seen)
