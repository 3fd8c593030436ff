"""compare: planning, reuse and resume of runs, the table's statistics, its files and the CLI.

The unit tests below replace the training loop by a runner that writes a metrics file
(the logic under test is compare's own); the end-to-end test at the bottom trains for real.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hpt_dsl.cli.main import app
from typer.testing import CliRunner

from hpt_dsl.compare import (
    Job,
    RunFailed,
    auto_parallel,
    compare,
    finished,
    plan,
    run_jobs,
    summarize,
    to_markdown,
)
from hpt_dsl.runs import RunData

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def fake_runner(job: Job, resume: bool, threads: int) -> None:
    """Writes a metrics file whose accuracy depends on the recipe and seed in a known way."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    base = {"sft": 0.2, "grpo": 0.4, "hpt": 0.6}[job.label]
    lines = []
    for step in (10, 20, 30):
        acc = base * step / 30 + 0.1 * job.seed
        lines.append({"step": step, "reward": acc, "tokens_per_s": 100.0 * (job.seed + 1),
                      "eval/avg@2": acc, "eval/pass@1": acc, "eval/pass@2": min(1.0, acc + 0.1)})
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_plan_one_folder_per_recipe_seed_and_setting(tmp_path: Path) -> None:
    recipes = [str(RECIPES / "sft.hpt"), str(RECIPES / "grpo.hpt")]
    jobs = plan(recipes, 2, ["train.steps=5"], tmp_path)
    assert [(j.label, j.seed) for j in jobs] == [("sft", 0), ("sft", 1), ("grpo", 0), ("grpo", 1)]
    assert all(f"train.seed={j.seed}" in j.overrides and "train.steps=5" in j.overrides for j in jobs)
    assert len({j.run_dir for j in jobs}) == 4
    again = plan(recipes, 2, ["train.steps=5"], tmp_path)
    assert [j.run_dir for j in again] == [j.run_dir for j in jobs]  # same settings: same folders
    other = plan(recipes, 2, ["train.steps=6"], tmp_path)
    assert not {j.run_dir for j in other} & {j.run_dir for j in jobs}  # new settings: new folders
    with pytest.raises(ValueError, match="named twice"):
        plan([recipes[0], recipes[0]], 1, [], tmp_path)


def _jobs(tmp_path: Path, labels: tuple[str, ...] = ("sft", "grpo", "hpt"), seeds: int = 3) -> list[Job]:
    return [Job(f"{label}.hpt", label, s, (f"train.seed={s}",), tmp_path / f"{label}-seed{s}", "fp")
            for label in labels for s in range(seeds)]


def test_finished_runs_are_reused_and_unfinished_ones_resumed(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, ("sft",), 2)
    calls: list[str] = []

    def counting(job: Job, resume: bool, threads: int) -> None:
        calls.append(f"{job.seed}:{resume}")
        fake_runner(job, resume, threads)

    run_jobs(jobs, counting)
    assert calls == ["0:False", "1:False"] and all(finished(j) for j in jobs)
    run_jobs(jobs, counting)
    assert calls == ["0:False", "1:False"]  # nothing ran again

    def crashing(job: Job, resume: bool, threads: int) -> None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        raise KeyboardInterrupt

    fresh = _jobs(tmp_path / "b", ("grpo",), 1)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(fresh, crashing)
    assert not finished(fresh[0])
    run_jobs(fresh, counting)
    assert calls[-1] == "0:True"  # the stopped run is resumed, not restarted
    assert finished(fresh[0])
    changed = Job(**{**fresh[0].__dict__, "fingerprint": "other"})
    assert not finished(changed)


def failing_runner(job: Job, resume: bool, threads: int) -> None:
    if job.seed == 1:
        raise RunFailed("stopped after 3 non-finite steps in a row")
    fake_runner(job, resume, threads)


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_faulty_run_is_reported_and_the_others_go_on(tmp_path: Path, parallel: int) -> None:
    jobs = _jobs(tmp_path, ("sft", "hpt"), 2)
    failures = run_jobs(jobs, failing_runner, parallel=parallel)
    assert sorted((j.label, j.seed) for j, _ in failures) == [("hpt", 1), ("sft", 1)]
    assert all("non-finite" in m for _, m in failures)
    assert [finished(j) for j in jobs] == [True, False, True, False]


def test_compare_tabulates_only_finished_runs(tmp_path: Path) -> None:
    recipes = [str(RECIPES / "sft.hpt"), str(RECIPES / "hpt.hpt")]
    res = compare(recipes, seeds=2, out=tmp_path, runner=failing_runner)
    assert [(r.label, r.seeds) for r in res.rows] == [("sft", 1), ("hpt", 1)]
    assert len(res.failures) == 2


def test_auto_parallel_shares_the_cores() -> None:
    procs, threads = auto_parallel(9)
    assert 1 <= procs <= 9 and threads >= 1
    assert auto_parallel(1)[0] == 1


def test_parallel_processes_run_every_job(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, ("hpt",), 2)
    run_jobs(jobs, fake_runner, parallel=2, threads=1)
    assert all(finished(j) for j in jobs)


def test_summary_statistics_over_seeds(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)
    run_jobs(jobs, fake_runner)
    from hpt_dsl.compare import load_job

    rows = {r.label: r for r in summarize([load_job(j) for j in jobs])}
    hpt = rows["hpt"]
    assert hpt.seeds == 3
    finals = [0.6 + 0.1 * s for s in range(3)]
    mean = sum(finals) / 3
    std = (sum((f - mean) ** 2 for f in finals) / 3) ** 0.5
    assert hpt.acc == pytest.approx((mean, std))
    assert hpt.pass_k is not None and hpt.pass_k[0] == 2
    assert hpt.pass_k[1] == pytest.approx(sum(min(1.0, f + 0.1) for f in finals) / 3)
    assert hpt.best_step == 30 and hpt.best_acc == pytest.approx(mean)
    assert hpt.tokens_per_s == pytest.approx(200.0)
    assert hpt.wall_s is not None and hpt.wall_s >= 0
    assert rows["sft"].acc is not None and rows["sft"].acc[0] == pytest.approx(0.3)
    md = to_markdown(list(rows.values()))
    assert md.splitlines()[0] == "| recipe | seeds | held-out acc | pass@2 | best step | wall s | tok/s |"
    assert "| hpt | 3 | 0.700 ± 0.082 |" in md


def test_best_step_prefers_the_earliest_of_equal_means() -> None:
    evals = [{"step": 10, "avg@1": 0.5}, {"step": 20, "avg@1": 0.5}, {"step": 30, "avg@1": 0.4}]
    (row,) = summarize([RunData(Path("r"), "x", evals=evals)])
    assert row.best_step == 10 and row.acc == pytest.approx((0.4, 0.0))


def test_compare_writes_table_csv_and_figures(tmp_path: Path) -> None:
    recipes = [str(RECIPES / f"{n}.hpt") for n in ("sft", "grpo", "hpt")]
    res = compare(recipes, seeds=2, out=tmp_path, runner=fake_runner)
    assert [r.label for r in res.rows] == ["sft", "grpo", "hpt"]
    with res.csv.open() as f:
        table = list(csv.DictReader(f))
    assert [t["recipe"] for t in table] == ["sft", "grpo", "hpt"]
    assert float(table[2]["acc_mean"]) == pytest.approx(0.65)
    assert "| grpo | 2 |" in res.markdown.read_text()
    names = {p.name for p in res.figures}
    assert {"accuracy.png", "reward.png", "pass_at_k.png"} <= names


def test_cli_compare_bad_recipe_and_bad_setting(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.hpt"
    bad.write_text("loss = mask=clip(0.2) adv=group_nrom\n")
    res = runner.invoke(app, ["compare", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "group_nrom" in res.output
    res = runner.invoke(app, ["compare", str(tmp_path / "missing.hpt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["compare", str(RECIPES / "sft.hpt"), "--set", "train.stepz=3",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "stepz" in res.output
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.slow
def test_compare_end_to_end_trains_tabulates_and_reuses(tmp_path: Path) -> None:
    """Two recipes x two seeds with the real training loop on the built-in task (a few tiny
    steps), then the same command again: every run is reused, nothing is retrained."""
    out = tmp_path / "cmp"
    sets = ["train.steps=2", "train.questions=2", "rollout.n=2", "rollout.max_new_tokens=6",
            "data.max_test=4", "train.eval_every=1", "train.save_every=0", "train.eval_n=2"]
    argv = ["compare", str(RECIPES / "sft.hpt"), str(RECIPES / "hpt.hpt"), "--seeds", "2", "--out", str(out),
            "--threads", "1", "--pass-k", "4"]
    for s in sets:
        argv += ["--set", s]
    runner = CliRunner()
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert res.output.count("finished") == 4
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["recipe"] for r in rows] == ["sft", "hpt"]
    assert all(r["seeds"] == "2" and r["acc_mean"] != "" and float(r["wall_s"]) > 0 for r in rows)
    assert rows[1]["pass_k"] == "4"  # the final models' own evaluation with 4 samples per question
    final = json.loads(next(out.glob("runs/hpt-seed0-*/pass_at_k.json")).read_text())
    assert final["k"] == 4 and final["questions"] == 4 and 0 <= final["pass@4"] <= 1
    for name in ("accuracy.png", "gate-hpt.png", "loss-sft.png", "pass_at_k.png"):
        assert (out / "plots" / name).exists(), name
    metrics = sorted(out.glob("runs/*/metrics.jsonl"))
    assert len(metrics) == 4
    stamps = [m.stat().st_mtime_ns for m in metrics]
    again = runner.invoke(app, argv)
    assert again.exit_code == 0, again.output
    assert again.output.count("reused") == 4 and "running" not in again.output
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    assert again.output.count("| sft") == 0  # the console shows the rich table, not Markdown
    assert (out / "compare.md").read_text().count("| sft | 2 |") == 1


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids |= {int(x) for x in task.read_text().split()}
    return kids


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, or a pid reused by another program, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.split(") ", 1)[1][0] != "Z" and b"python" in cmdline


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_sigterm_to_compare_stops_its_workers_and_checkpoints_their_runs(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) reaches only the comparing process; its worker processes must not go
    on training as orphans: each run checkpoints and stops, for the same command to resume, and
    no queued run starts (four runs on two workers: only the first two ever exist)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "hpt_dsl.cli.main", "compare", str(RECIPES / "sft.hpt"), "--seeds", "4",
            "--jobs", "2", "--threads", "1", "--out", str(out), "--set", "train.steps=100000",
            "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "data.max_test=4"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("runs/*/metrics.jsonl"))) < 2:
        time.sleep(0.5)
    assert len(list(out.glob("runs/*/metrics.jsonl"))) == 2, "both runs should be training"
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, output
    assert "interrupted" in output
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.5)
    assert not any(_alive(p) for p in workers), "a worker went on training after the compare stopped"
    runs = list(out.glob("runs/*"))
    assert len(runs) == 2, "a queued run started after the compare stopped"
    for run in runs:  # each run stopped with a checkpoint to resume from
        assert any((run / "checkpoints").glob("*")), sorted(p.name for p in run.iterdir())
