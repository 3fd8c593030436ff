"""Figures of finished (or running) runs: one picture per file, PNG and SVG.

``plot_runs(run_dirs, out_dir)`` reads each run folder (``metrics.jsonl``, evaluation
results, the resolved recipe), groups the runs by recipe, and draws:

    accuracy.png          held-out accuracy over steps (mean over seeds, band = +/- 1 std)
    reward.png            mean training reward over steps (moving average)
    gate-<recipe>.png     share of questions on each gate branch over steps (gated recipes)
    loss-<recipe>.png     each loss term over steps
    entropy.png           mean token entropy of the rollouts over steps
    response_length.png   mean response length (tokens) over steps
    pass_at_k.png         pass@k of the final evaluation against k (log2 axis)

A figure whose metric no run recorded is skipped, never drawn empty. Matplotlib runs on
its Agg backend (no display needed).

Curves of several seeds are aligned on the steps every seed has; the band is the
population standard deviation over seeds at each step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpt_dsl import runs as runfiles
from hpt_dsl.faults import is_disk_error, write_fault
from hpt_dsl.runs import RunData

FORMATS = ("png", "svg")
SMOOTH = 5
"""Moving-average window (steps) for noisy per-step training curves."""


@dataclass
class Curve:
    """One line of a figure: x, y, and optionally a +/- band."""

    label: str
    x: list[float]
    y: list[float]
    band: list[float] | None = None
    style: dict[str, Any] = field(default_factory=dict)  # extra matplotlib line options


# ----- series --------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def moving_average(y: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: out[i] = mean(y[max(0, i-window+1) .. i])."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v
        if i >= window:
            total -= y[i - window]
        out.append(total / min(i + 1, window))
    return out


def seed_curve(
    label: str, runs: Sequence[RunData], get: Callable[[RunData], dict[float, float]], smooth: int = 1
) -> Curve | None:
    """Mean (and std band when several seeds) over runs of ``get(run) -> {step: value}``,
    on the steps all runs share; None when no run has the metric."""
    per_run = [get(r) for r in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    stats = [mean_std([p[s] for p in per_run]) for s in steps]
    y = moving_average([m for m, _ in stats], smooth) if smooth > 1 else [m for m, _ in stats]
    band = None
    if len(per_run) > 1:
        sd = [s for _, s in stats]
        band = moving_average(sd, smooth) if smooth > 1 else sd
    return Curve(label, [float(s) for s in steps], y, band)


# ----- drawing -----------------------------------------------------------------------------


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, out_dir: Path, name: str, formats: Iterable[str], note: str | None = None) -> list[Path]:
    """Write the figure; ``note`` (where, when and how it was measured) goes in small print below."""
    import textwrap

    import matplotlib.pyplot as plt

    if note:
        lines = textwrap.wrap(note, 150)
        fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.12 * len(lines))
        fig.text(0.01, 0.008, "\n".join(lines), fontsize=5.5, color="0.35", va="bottom", ha="left")
        fig.tight_layout(rect=(0, 0.03 * len(lines) + 0.01, 1, 1))
    else:
        fig.tight_layout()
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt)
        paths.append(path)
    plt.close(fig)
    return paths


def line_figure(
    curves: Sequence[Curve],
    title: str,
    xlabel: str,
    ylabel: str,
    out_dir: Path,
    name: str,
    formats: Iterable[str] = FORMATS,
    ylim: tuple[float, float] | None = None,
    logx2: bool = False,
    note: str | None = None,
) -> list[Path]:
    """One figure of lines (with bands), legend outside the data when there are many. Past
    the ten colours of the palette the lines repeat them dashed, then dotted."""
    if not curves:
        return []
    fig, ax = _figure(title, xlabel, ylabel)
    for i, c in enumerate(curves):
        marker = "o" if len(c.x) <= 12 else None
        opts: dict[str, Any] = {"linewidth": 1.6, "marker": marker, "markersize": 3.5, "color": f"C{i % 10}",
                                "linestyle": ("-", "--", ":")[(i // 10) % 3]}  # fmt: skip
        (line,) = ax.plot(c.x, c.y, label=c.label, **{**opts, **c.style})
        if c.band is not None:
            lo = [y - b for y, b in zip(c.y, c.band, strict=True)]
            hi = [y + b for y, b in zip(c.y, c.band, strict=True)]
            ax.fill_between(c.x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logx2:
        ax.set_xscale("log", base=2)
        ticks = sorted({x for c in curves for x in c.x})
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.legend(fontsize=8, ncol=2 if len(curves) > 5 else 1, loc="best", framealpha=0.85)
    return _save(fig, out_dir, name, formats, note)


def stacked_figure(
    x: Sequence[float], shares: dict[str, list[float]], title: str, out_dir: Path, name: str,
    formats: Iterable[str] = FORMATS, note: str | None = None,
) -> list[Path]:
    """Stacked areas of shares that sum to 1 at each x (the gate split)."""
    if not x or not shares:
        return []
    fig, ax = _figure(title, "training step", "share of questions")
    ax.stackplot(list(x), *shares.values(), labels=list(shares), alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlim(min(x), max(x))
    ax.legend(fontsize=8, loc="upper right", framealpha=0.85)
    return _save(fig, out_dir, name, formats, note)


# ----- the figures of a set of runs ----------------------------------------------------------


def slug(label: str) -> str:
    """A file-name-safe form of a recipe label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def group_runs(runs: Iterable[RunData]) -> dict[str, list[RunData]]:
    """Runs by label (the recipe name), in first-seen order."""
    out: dict[str, list[RunData]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def plot_runs(
    run_dirs: Sequence[Path | str] | None = None,
    out_dir: Path | str = "plots",
    runs: Sequence[RunData] | None = None,
    formats: Iterable[str] = FORMATS,
    note: str | None = None,
) -> list[Path]:
    """Draw every figure the runs have data for into ``out_dir``; returns the file paths.
    ``note``: the small print of every figure (machine, date, command, seeds)."""
    if runs is None:
        runs = [runfiles.load_run(Path(p)) for p in run_dirs or ()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    groups = group_runs(runs)
    paths: list[Path] = []
    seeds = sorted({len(g) for g in groups.values()})
    band_note = " (band: ±1 std over seeds)" if seeds and max(seeds) > 1 else ""

    def curves(get: Callable[[RunData], dict[float, float]], smooth: int = 1) -> list[Curve]:
        found = [seed_curve(label, g, get, smooth) for label, g in groups.items()]
        return [c for c in found if c is not None]

    acc = curves(runfiles.eval_accuracy)
    paths += line_figure(acc, f"Held-out accuracy{band_note}", "training step", "accuracy (fraction correct)",
                         out, "accuracy", formats, ylim=(-0.02, 1.02), note=note)
    smooth_note = f", moving average over {SMOOTH} steps"
    paths += line_figure(curves(lambda r: runfiles.step_series(r, "reward"), SMOOTH),
                         f"Training reward{smooth_note}", "training step", "mean reward per rollout",
                         out, "reward", formats, note=note)
    paths += line_figure(curves(lambda r: runfiles.step_series(r, "entropy"), SMOOTH),
                         f"Rollout entropy{smooth_note}", "training step", "entropy (nats per token)",
                         out, "entropy", formats, note=note)
    paths += line_figure(curves(lambda r: runfiles.step_series(r, "response_length"), SMOOTH),
                         f"Response length{smooth_note}", "training step", "mean response length (tokens)",
                         out, "response_length", formats, note=note)
    for label, g in groups.items():
        x, shares = runfiles.gate_shares(g)
        if len(shares) > 1:
            paths += stacked_figure(x, shares, f"Gate split: {label} (share of questions per branch)",
                                    out, f"gate-{slug(label)}", formats, note)
        loss_curves = []
        for term in runfiles.loss_terms(g[0]):
            c = seed_curve(term, g, lambda r, t=term: runfiles.step_series(r, t), SMOOTH)
            if c is not None:
                total = term == "loss"
                c.label = "total" if total else f"{term.removeprefix('loss/')} term"
                if total:
                    c.style.update(color="black", linestyle="--", linewidth=1.2)
                loss_curves.append(c)
        paths += line_figure(loss_curves, f"Loss terms: {label}{smooth_note}", "training step",
                             "loss (per token, as aggregated)", out, f"loss-{slug(label)}", formats, note=note)
    pk = []
    for label, g in groups.items():
        finals = [runfiles.final_pass_at_k(r) for r in g]
        finals = [f for f in finals if f]
        if finals:
            ks = sorted(set.intersection(*(set(f) for f in finals)))
            stats = [mean_std([f[k] for f in finals]) for k in ks]
            band = [s for _, s in stats] if len(finals) > 1 else None
            pk.append(Curve(label, [float(k) for k in ks], [m for m, _ in stats], band))
    pk = [c for c in pk if len(c.x) > 1]  # pass@1 alone is the accuracy figure
    paths += line_figure(pk, f"pass@k of the final evaluation{band_note}", "k (samples per question)",
                         "pass@k", out, "pass_at_k", formats, ylim=(-0.02, 1.02), logx2=True, note=note)
    return paths


def draw_run_figures(run_dir: Path, message: Callable[[str], None]) -> str:
    """The figures of one run (``hpt-dsl plot``) drawn into ``run_dir/plots`` at its end, and
    what was drawn, in words for the run's summary. A failure to draw is a ``message`` (the run
    itself is complete); a failure to write them (a full disk) a ``RunFault`` that says so."""
    try:
        paths = plot_runs([run_dir], run_dir / "plots")
    except Exception as err:  # the run itself is complete: say why there is no figure
        if isinstance(err, OSError) or is_disk_error(err):
            raise write_fault("the figures", run_dir / "plots", err, then="The run and its final model are "
                              f"complete; draw the figures again with: hpt-dsl plot {run_dir}") from err
        message(f"no figures: {err}")
        return "none"
    return f"{run_dir / 'plots'} ({len([p for p in paths if p.suffix == '.png'])} PNG + SVG)"
