"""The house rules of the code: imports go one way, and there is no import cycle.

Read from the sources with ``ast`` (nothing is imported). Parts, as the architecture page
draws them:

    Lang       hpt_dsl/lang/                 text -> checked recipe (no torch)
    Neutral    recipe, settings, errors, faults, plugin, batch   types every side shares
    Estimator  hpt_dsl/estimator/, verify    pure tensor functions
    Rollout    hpt_dsl/rollout/              the engines that sample
    Learner    hpt_dsl/learner/, logprob     the engines that update
    Loop       train, dist, checkpoint, sampling, runfolder, manifest, malloc, process
    Face       cli/                          the command line

Never: Lang -> Estimator or Loop; Estimator -> Lang, Rollout, Learner or Loop; Rollout <->
Learner; Rollout or Learner -> Loop; anything in hpt_dsl/ -> Face. ``batch`` holds the train
batch, the type the loop, the learners and the rollout engine share: it imports none of them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"hpt_dsl": ROOT / "hpt_dsl", "hpt_dsl.cli": ROOT / "cli", "hpt_dsl.grammar": ROOT / "grammar"}
NEUTRAL = {"recipe", "settings", "errors", "faults", "plugin", "batch"}
LOOP = {"train", "dist", "checkpoint", "sampling", "runfolder", "manifest", "malloc", "process"}
NEVER = {
    ("Lang", "Estimator"), ("Lang", "Loop"), ("Estimator", "Lang"), ("Estimator", "Rollout"),
    ("Estimator", "Learner"), ("Estimator", "Loop"), ("Rollout", "Learner"), ("Learner", "Rollout"),
    ("Learner", "Loop"), ("Rollout", "Loop"),
} | {(part, "Face") for part in ("Lang", "Neutral", "Estimator", "Rollout", "Learner", "Loop", "Other")}  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for prefix, base in PACKAGES.items():
        for f in base.rglob("*.py"):
            parts = [p for p in f.relative_to(base).with_suffix("").parts if p != "__init__"]
            if prefix == "hpt_dsl" and parts and parts[0] in ("cli", "grammar"):
                continue
            out[".".join([prefix, *parts])] = f
    return out


MODULES = modules()


def part(module: str) -> str:
    name = module.removeprefix("hpt_dsl.")
    top = name.split(".")[0]
    if module.startswith("hpt_dsl.cli"):
        return "Face"
    if top == "lang":
        return "Lang"
    if top in NEUTRAL:
        return "Neutral"
    if top in ("estimator", "verify"):
        return "Estimator"
    if top == "rollout":
        return "Rollout"
    if top in ("learner", "logprob"):
        return "Learner"
    if top in LOOP:
        return "Loop"
    return "Other"


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The hpt_dsl modules ``module`` imports: at import time only (``top_level_only``: no
    function bodies, no ``if TYPE_CHECKING``), or anywhere."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if top_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and top_level_only:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                m = resolve(node)
                subs = [f"{m}.{a.name}" for a in node.names]
                found.update(s for s in subs if s in MODULES)
                if any(s not in MODULES for s in subs):
                    found.add(m)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt) and not isinstance(node, ast.Import | ast.ImportFrom):
                    visit([child])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in MODULES and m != module}


def test_no_import_cycles() -> None:
    graph = {m: imports(f, m, top_level_only=True) for m, f in MODULES.items()}
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_imports_go_one_way() -> None:
    wrong = []
    for m, f in MODULES.items():
        for target in imports(f, m, top_level_only=False):
            if (part(m), part(target)) in NEVER:
                wrong.append(f"{m} ({part(m)}) imports {target} ({part(target)})")
    assert wrong == []


def test_the_planted_violation_is_caught(tmp_path: Path) -> None:
    """The scan sees a function-level import (the test above is not vacuous)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from hpt_dsl.train import SetupError\n    return SetupError\n")
    assert "hpt_dsl.train" in imports(f, "hpt_dsl.learner.x", top_level_only=False)
    assert "hpt_dsl.train" not in imports(f, "hpt_dsl.learner.x", top_level_only=True)


@pytest.mark.parametrize("path", ["hpt_dsl/learner/base.py", "hpt_dsl/dist.py"])
def test_the_prepared_batch_is_typed(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    assert not re.search(r"\b(prep|program): Any\b", text)
