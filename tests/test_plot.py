"""Figures and run-folder reading: series statistics, file names, skipped figures, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hpt_dsl.cli.main import app
from typer.testing import CliRunner

from hpt_dsl.plot import mean_std, moving_average, plot_runs, seed_curve, slug
from hpt_dsl.runs import RunData, RunError, final_pass_at_k, gate_shares, load_run, read_jsonl, step_series


def write_run(
    root: Path, label: str, seed: int, steps: int = 12, gate: bool = True, evals: bool = True
) -> Path:
    """A run folder in the layout ``hpt-dsl run`` writes, with made-up but plausible numbers."""
    d = root / f"{label}-seed{seed}"
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        sft = max(0.0, 1 - s / 8)
        row = {"step": s, "reward/mean": s / steps + 0.01 * seed, "entropy": 1.0 / s,
               "response_length": 20 + s, "loss": 1.0 / s, "loss/sft": sft, "tokens_per_s": 100.0 + seed}
        if gate:
            row.update({"gate/sft": sft, "gate/grpo": 1 - sft, "gate/sft/nonfinite": 0.0,
                        "branch/acc > 0": 1 - sft, "branch/else": sft})
        else:  # a plain sum: every question trains on every term, no branches
            row.update({"gate/sft": 1.0, "gate/off": 1.0})
        if evals and s % 4 == 0:
            acc = s / steps / (1 + seed)
            row.update({"eval/avg@4": acc, "eval/pass@1": acc, "eval/pass@2": min(1, 1.5 * acc),
                        "eval/pass@4": min(1, 2 * acc)})
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_moving_average_matches_the_definition() -> None:
    y = [1.0, 2.0, 6.0, 3.0, 8.0]
    got = moving_average(y, 3)
    want = [sum(y[max(0, i - 2) : i + 1]) / len(y[max(0, i - 2) : i + 1]) for i in range(len(y))]
    assert got == pytest.approx(want)
    assert moving_average(y, 1) == y


def test_seed_curve_mean_and_population_std_on_shared_steps() -> None:
    a = RunData(Path("a"), "x", steps=[{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}])
    b = RunData(Path("b"), "x", steps=[{"step": 1, "reward": 1.0}, {"step": 2, "reward": 1.0},
                                       {"step": 3, "reward": 1.0}])
    c = seed_curve("x", [a, b], lambda r: step_series(r, "reward"))
    assert c is not None
    assert c.x == [1.0, 2.0]  # step 3 is not in every run
    assert c.y == pytest.approx([0.5, 1.0])
    assert c.band == pytest.approx([0.5, 0.0])
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert seed_curve("x", [a], lambda r: step_series(r, "nothing")) is None


def test_plot_runs_writes_one_named_file_per_figure(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path / "runs", "hpt", s) for s in range(2)]
    dirs.append(write_run(tmp_path / "runs", "sft", 0, gate=False))
    paths = plot_runs(dirs, tmp_path / "plots")
    names = {p.name for p in paths}
    stems = ("accuracy", "reward", "entropy", "response_length", "gate-hpt", "loss-hpt", "loss-sft",
             "pass_at_k")
    for stem in stems:
        assert f"{stem}.png" in names and f"{stem}.svg" in names, stem
    assert "gate-sft.png" not in names  # no gate keys: no empty figure
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
    assert (tmp_path / "plots" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "plots" / "accuracy.svg").read_text()
    assert "Held-out accuracy" in svg and "training step" in svg


def test_runs_without_evaluations_skip_the_accuracy_figures(tmp_path: Path) -> None:
    d = write_run(tmp_path, "grpo", 0, evals=False)
    names = {p.name for p in plot_runs([d], tmp_path / "plots", formats=("png",))}
    assert "accuracy.png" not in names and "pass_at_k.png" not in names
    assert "reward.png" in names


def test_a_run_without_rollouts_draws_no_rollout_curves(tmp_path: Path) -> None:
    sft = write_run(tmp_path, "sft", 0, gate=False)
    (sft / "run.json").write_text(json.dumps({"label": "sft", "seed": 0, "needs": {"rollouts": False}}))
    run = load_run(sft)
    assert step_series(run, "reward") == {} and step_series(run, "response_length") == {}
    assert step_series(run, "loss")  # its loss is still there
    names = {p.name for p in plot_runs([sft], tmp_path / "plots", formats=("png",))}
    assert "reward.png" not in names and "loss-sft.png" in names


def test_load_run_reads_evaluations_gate_and_pass_at_k(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "hpt", 1))
    assert run.label == "hpt"
    assert [e["step"] for e in run.evals] == [4, 8, 12]
    assert final_pass_at_k(run) == pytest.approx({1: 0.5, 2: 0.75, 4: 1.0})
    steps, shares = gate_shares([run])
    assert list(shares) == ["acc > 0: grpo", "else: sft"]  # each branch named by the term it trains
    assert steps[0] == 1.0 and shares["else: sft"][0] == pytest.approx(7 / 8)
    pairs = zip(shares["else: sft"], shares["acc > 0: grpo"], strict=True)
    assert all(math.isclose(a + b, 1.0) for a, b in pairs)


def test_torn_last_line_is_ignored_but_damage_inside_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(f) == [{"step": 1}, {"step": 2}]
    f.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunError, match=r"m.jsonl:2"):
        read_jsonl(f)


def test_slug_makes_file_names_safe() -> None:
    assert slug("hpt gamma 1/8") == "hpt_gamma_1_8"
    assert slug("///") == "run"


def test_cli_plot_prints_paths_and_rejects_a_folder_without_metrics(tmp_path: Path) -> None:
    d = write_run(tmp_path, "hpt", 0)
    runner = CliRunner()
    res = runner.invoke(app, ["plot", str(d), "--no-svg"])
    assert res.exit_code == 0, res.output
    assert str(d / "plots" / "accuracy.png") in res.output
    assert not list((d / "plots").glob("*.svg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["plot", str(empty)])
    assert res.exit_code == 2
    assert "no metrics.jsonl" in res.output


def test_cli_plot_note_goes_under_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpt_dsl import plot

    notes = []
    save = plot._save

    def spy(fig, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        paths = save(fig, *args, **kwargs)
        notes.append([t.get_text() for t in fig.texts])
        return paths

    monkeypatch.setattr(plot, "_save", spy)
    d = write_run(tmp_path, "hpt", 0)
    res = CliRunner().invoke(app, ["plot", str(d), "--no-svg", "--note", "2-core CPU, 2026-12-03, seeds 0-2: hpt-dsl"])
    assert res.exit_code == 0, res.output
    assert len(notes) >= 4 and all("2-core CPU, 2026-12-03, seeds 0-2: hpt-dsl" in n for n in notes)


def test_many_lines_stay_apart_and_the_note_is_printed_below(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eleven recipes: the eleventh repeats the first colour dashed, never the same line; a note
    (machine, date, command, seeds) adds small print under the figure."""
    from hpt_dsl import plot

    seen = []
    save = plot._save

    def spy(fig, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        paths = save(fig, *args, **kwargs)
        seen.append(([(line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()],
                     [t.get_text() for t in fig.texts], fig.get_figheight()))  # fmt: skip
        return paths

    monkeypatch.setattr(plot, "_save", spy)
    curves = [plot.Curve(f"r{i}", [0.0, 1.0], [0.0, float(i)]) for i in range(11)]
    plot.line_figure(curves, "t", "x", "y", tmp_path, "a", ("png",))
    plot.line_figure(curves, "t", "x", "y", tmp_path, "b", ("png",), note="2-core x86_64 CPU, 2026-12-03, seeds 0-2")
    styles, texts, height = seen[0]
    assert len(set(styles)) == 11 and styles[10] == (styles[0][0], "--")
    assert texts == [] and seen[1][1] == ["2-core x86_64 CPU, 2026-12-03, seeds 0-2"] and seen[1][2] > height


def test_compare_figures_name_machine_date_seeds_and_command() -> None:
    from hpt_dsl.compare import provenance

    note = provenance(["recipes/sft.hpt", "recipes/hpt.hpt"], 3, ["train.steps=60"], 8)
    assert "seeds 0-2" in note
    assert note.endswith("hpt-dsl compare recipes/sft.hpt recipes/hpt.hpt --seeds 3 --set train.steps=60 --pass-k 8")
    import re

    assert re.search(r"\d{4}-\d\d-\d\d", note)
