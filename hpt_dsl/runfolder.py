"""The layout of a run folder, and ``verify``: what is complete in it and what a resume would take.

    RUN_DIR/
        recipe.hpt, run.json, metrics.jsonl
        checkpoints/step-000020/        a checkpoint (``hpt_dsl.checkpoint``), with manifest.json
        checkpoints/.tmp-step-000025/   a write that did not finish (never taken by a resume)
        checkpoints/step-000010.damaged a checkpoint that failed verification, moved aside
        final-model/                    the policy as a Hugging Face folder, with manifest.json

The loop keeps its folder with ``choose_run_dir`` (which folder), ``check_fresh`` (never over
another run), ``open_run_folder`` (``recipe.hpt`` and ``run.json`` before the first step) and
``close_run_folder`` (``run.json`` completed, with the run's results).

``verify(run_dir)`` checks every checkpoint and the final model against their manifests
(sizes and CRC-32 checksums), and that ``metrics.jsonl`` and ``run.json`` read; it loads no
model and imports no torch (``hpt-dsl runs verify``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt_dsl import manifest
from hpt_dsl.errors import SetupError
from hpt_dsl.faults import human, write_fault

if TYPE_CHECKING:
    from hpt_dsl.recipe import Recipe

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final-model"
STEP = re.compile(r"^step-(\d+)$")
DAMAGED = ".damaged"


# ----- the run's own files -------------------------------------------------------------------


def default_run_dir(recipe: Recipe) -> Path:
    """``runs/<recipe>-<date>-<time>``."""
    name = Path(recipe.path).name.removesuffix(".hpt") if recipe.path else "run"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def choose_run_dir(recipe: Recipe, output: Path | None, resume: bool = False) -> tuple[Path, str | None]:
    """(run folder, warning): ``output`` (the folder of --output or --resume), else the recipe's
    ``train.output_dir``, else ``default_run_dir``; the warning, when ``output`` overrides a
    ``train.output_dir`` that names another folder, says that setting has no effect."""
    setting = recipe.settings.train.output_dir
    run_dir = Path(output) if output is not None else Path(setting) if setting else default_run_dir(recipe)
    if output is None or not setting or Path(setting) == run_dir:
        return run_dir, None
    flag = "--resume" if resume else "--output"
    return run_dir, f"train.output_dir = {setting} has no effect: {flag} {run_dir} is the run folder"


def check_fresh(run_dir: Path) -> None:
    """A new run never writes over another one: ``SetupError`` when ``run_dir`` holds a run."""
    if run_dir.exists() and (run_dir / "metrics.jsonl").exists():
        raise SetupError(f"run folder {run_dir} already holds a run; use --resume {run_dir} or another --output")


def write_run_json(run_dir: Path, recipe: Recipe, **extra: Any) -> None:
    """``run.json``: the recipe, its loss, needs and settings, and ``extra``, over what the file
    held (written to a temporary file, then moved over it)."""
    path = run_dir / "run.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(
        {
            "label": Path(recipe.path).name.removesuffix(".hpt"),
            "recipe": recipe.path,
            "seed": recipe.settings.train.seed,
            "loss": {name: spec.components() for name, spec in recipe.estimators.items()},
            "needs": recipe.needs.__dict__,
            "settings": recipe.settings.model_dump(mode="json"),
        }
    )
    data.update(extra)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def open_run_folder(run_dir: Path, recipe: Recipe, main: bool, processes: int) -> None:
    """Create ``run_dir``; the first process (``main``) writes ``recipe.hpt`` and ``run.json``
    (not completed yet). A write that fails is a ``RunFault``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            if recipe.source:
                (run_dir / "recipe.hpt").write_text(recipe.source)
            write_run_json(run_dir, recipe, completed=False, processes=processes)
    except OSError as err:
        raise write_fault("the run folder", run_dir, err) from err


def close_run_folder(run_dir: Path, recipe: Recipe, **results: Any) -> None:
    """``run.json`` completed, with the run's ``results``. A write that fails is a ``RunFault``
    that says the final model is complete."""
    try:
        write_run_json(run_dir, recipe, completed=True, **results)
    except OSError as err:
        raise write_fault("run.json", run_dir, err, then="The final model is complete.") from err


# ----- checkpoints and verification ----------------------------------------------------------


def step_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-N`` folder, oldest first, whatever it holds."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class Finding:
    """One thing checked: its path, whether it is sound (a note is neither sound nor damaged:
    an unfinished write, a folder moved aside), and what was found."""

    path: Path
    ok: bool
    detail: str
    note: bool = False


def _folder(path: Path) -> Finding:
    found = manifest.problems(path)
    if found:
        return Finding(path, False, "damaged: " + "; ".join(found))
    files = manifest.read(path)
    return Finding(path, True, f"complete ({len(files)} files, {human(manifest.size(path) or 0)})")


def verify(run_dir: Path) -> tuple[list[Finding], str]:
    """(findings, what a resume would do). Raises ``FileNotFoundError`` when ``run_dir`` is not
    a run folder."""
    if not run_dir.is_dir() or not any((run_dir / n).exists() for n in ("run.json", "metrics.jsonl", CHECKPOINTS)):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no run.json, metrics.jsonl or checkpoints/); "
                                "pass a folder written by 'hpt-dsl run'")
    out: list[Finding] = []
    resume_from: Path | None = None
    for path in reversed(step_folders(run_dir)):
        f = _folder(path)
        out.append(f)
        if f.ok and resume_from is None:
            resume_from = path
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for path in sorted(root.glob(".tmp-*")):
            out.append(Finding(path, True, "an unfinished write: never taken by a resume, removed by the next save",
                               note=True))
        for path in sorted(root.glob(f"*{DAMAGED}*")):
            out.append(Finding(path, True, "moved aside by an earlier resume (kept for inspection; safe to delete)",
                               note=True))
    final = run_dir / FINAL_MODEL
    if final.is_dir():
        out.append(_folder(final))
    out += [_json_lines(run_dir / "metrics.jsonl"), _json(run_dir / "run.json")]
    newest = step_folders(run_dir)[-1:] or [None]
    if resume_from is None:
        verdict = "a resume finds no complete checkpoint" + (
            ": it stops with an error, the damaged ones moved aside" if newest[0] else " and starts from step 0")
    elif resume_from == newest[0]:
        verdict = f"a resume takes {resume_from.name}"
    else:
        verdict = f"a resume moves the damaged newer checkpoints aside and takes {resume_from.name}"
    return out, verdict


def _json_lines(path: Path) -> Finding:
    if not path.exists():
        return Finding(path, True, "absent (the run wrote no step yet)")
    good = bad = 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        try:
            json.loads(line)
            good += 1
        except json.JSONDecodeError:
            if i < len(lines):
                bad += 1
    if bad:
        return Finding(path, False, f"{bad} damaged lines among {good + bad} (a resume rewrites the file "
                                    "without them)")
    return Finding(path, True, f"{good} lines")


def _json(path: Path) -> Finding:
    if not path.exists():
        return Finding(path, False, "missing")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return Finding(path, False, f"damaged ({e}); a resume writes it again")
    return Finding(path, True, "reads")
