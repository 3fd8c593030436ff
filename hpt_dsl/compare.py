"""Compare recipes: the same data, model, budget and seeds for each, one table, one set of figures.

    compare(["recipes/sft.hpt", "recipes/grpo.hpt", "recipes/hpt.hpt"], seeds=3, out="compare")

runs every (recipe, seed) pair with the same ``--set`` overrides plus ``train.seed=<seed>``
(seeds 0 .. N-1), each into ``out/runs/<recipe>-seed<seed>-<fingerprint>``, where the
fingerprint is a hash of the resolved recipe (loss tree and every setting). A pair whose
folder holds a finished run is reused; an unfinished one is resumed; a changed recipe or
setting gets a new folder, so earlier results are never overwritten.

For each recipe the table reports, over seeds (mean ± population std):

    acc        held-out accuracy of the last evaluation
    pass@k     pass@k of the last evaluation, for the largest k it reports
    best step  the evaluation step of the highest mean accuracy (chosen on the held-out
               set: an optimistic figure, labelled as such)
    wall s     wall-clock seconds per run
    tok/s      generated tokens per second of rollout (mean over steps)

written as ``out/compare.md`` and ``out/compare.csv``, with the figures of ``hpt_dsl.plot``
in ``out/plots``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpt_dsl import runs as runfiles
from hpt_dsl.runs import RunData

MARKER = "compare.json"
"""Written into a run folder by ``compare`` once the run finished: fingerprint, label, seed, seconds."""
PARTIAL = "compare.partial.json"
"""Seconds spent on a run that stopped before it finished (added up on resume)."""
PASS_AT_K = "pass_at_k.json"
"""The final model's evaluation with k samples per test question (``--pass-k``)."""


@dataclass(frozen=True)
class Job:
    """One (recipe, seed) run of a comparison."""

    recipe: str
    label: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path
    fingerprint: str
    pass_k: int = 0  # > 0: evaluate the final model with this many samples per test question


Runner = Callable[[Job, bool, int], None]
"""runner(job, resume, threads): train ``job.recipe`` with ``job.overrides`` into ``job.run_dir``."""


@dataclass
class Row:
    """One recipe's line of the table (statistics over its seeds)."""

    label: str
    seeds: int
    acc: tuple[float, float] | None = None
    pass_k: tuple[int, float, float] | None = None
    best_step: float | None = None
    best_acc: float | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    runs: list[RunData] = field(default_factory=list, repr=False)


# ----- planning -------------------------------------------------------------------------------


def fingerprint(recipe: Any) -> str:
    """A hash of the resolved recipe: its loss tree and every setting except where it writes."""
    settings = recipe.settings.model_dump(mode="json")
    settings["train"].pop("output_dir", None)
    blob = json.dumps({"loss": repr(recipe.loss), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def label_of(path: str) -> str:
    """The recipe's name in tables and figures: its file name without ``.hpt``."""
    return Path(path).name.removesuffix(".hpt")


def plan(
    recipes: Sequence[str], seeds: int, overrides: Sequence[str], out: Path, pass_k: int = 0
) -> list[Job]:
    """Every (recipe, seed) job, each recipe checked first (raises ``RecipeError``)."""
    from hpt_dsl.lang import load_recipe

    labels = [label_of(r) for r in recipes]
    dupes = {x for x in labels if labels.count(x) > 1}
    if dupes:
        raise ValueError(f"recipes named twice: {', '.join(sorted(dupes))}; give each recipe once")
    jobs = []
    for path, label in zip(recipes, labels, strict=True):
        for seed in range(seeds):
            sets = (*overrides, f"train.seed={seed}")
            fp = fingerprint(load_recipe(path, overrides=sets))
            jobs.append(Job(path, label, seed, sets, out / "runs" / f"{label}-seed{seed}-{fp}", fp, pass_k))
    return jobs


def finished(job: Job) -> bool:
    """True when ``job.run_dir`` holds a run of this very recipe that completed (and, with
    ``job.pass_k``, its final evaluation with that k)."""
    data = _read_json(job.run_dir / MARKER)
    trained = data.get("fingerprint") == job.fingerprint and data.get("completed") is True
    return trained and (job.pass_k <= 0 or evaluated(job))


def evaluated(job: Job) -> bool:
    return _read_json(job.run_dir / PASS_AT_K).get("k") == job.pass_k


# ----- running ---------------------------------------------------------------------------------


def default_runner(job: Job, resume: bool, threads: int) -> None:
    """Train one job in this process with the library's training loop."""
    from hpt_dsl import train

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    train.run_recipe(job.recipe, overrides=list(job.overrides), output=job.run_dir, resume=resume, quiet=True)


def final_pass_at_k(job: Job) -> dict[str, Any]:
    """Sample ``job.pass_k`` responses per test question from the run's final model (the
    run's own evaluation settings: temperature, top-p, length, prompts, reward) and write
    avg@k and pass@k to ``pass_at_k.json``."""
    from transformers.utils import logging as hf_logging

    from hpt_dsl.data import load_task
    from hpt_dsl.evaluate import evaluate
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.models import load_local
    from hpt_dsl.prompting import PromptCache
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.hf import HFRolloutEngine

    hf_logging.disable_progress_bar()  # the comparison has its own progress lines
    s = load_recipe(job.recipe, overrides=job.overrides).settings
    model, tokenizer = load_local(job.run_dir / "final-model", s.model)
    task = load_task(s)
    prompts = PromptCache(tokenizer, s.model)
    params = SamplingParams(
        n=job.pass_k,
        temperature=s.eval.temperature,
        top_p=s.eval.top_p,
        max_new_tokens=s.eval.max_new_tokens or s.rollout.max_new_tokens,
        seed=s.train.seed + 54321,
    )
    reward = task.reward_fn
    if s.eval.reward is not None and s.data.train != "arith":
        from hpt_dsl.data.verify import make_reward

        reward = make_reward(s.data.model_copy(update={"reward": s.eval.reward}))
    result = evaluate(
        HFRolloutEngine(model, tokenizer, s), tokenizer, task.test, reward, job.pass_k, params,
        encode=lambda q: prompts.prompt(q, "test"), batch_questions=64,
    )
    result.pop("correct", None)
    _write_json(job.run_dir / PASS_AT_K, result)
    return result


def _execute(job: Job, runner: Runner, threads: int) -> Job:
    """Run (or resume) one job, mark it finished, then evaluate it when asked (time spent
    before a crash is kept in ``compare.partial.json`` and added when the job is resumed)."""
    if not finished(replace(job, pass_k=0)):
        resume = job.run_dir.exists() and any(p.name != PARTIAL for p in job.run_dir.iterdir())
        before = _read_json(job.run_dir / PARTIAL).get("seconds", 0.0) if resume else 0.0
        start = time.perf_counter()
        try:
            runner(job, resume, threads)
        except BaseException:
            if job.run_dir.exists():
                _write_json(job.run_dir / PARTIAL, {"seconds": before + time.perf_counter() - start})
            raise
        _write_json(job.run_dir / MARKER, {
            "fingerprint": job.fingerprint, "label": job.label, "seed": job.seed, "recipe": job.recipe,
            "overrides": list(job.overrides), "seconds": before + time.perf_counter() - start,
            "completed": True,
        })
    if job.pass_k > 0 and not evaluated(job):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        final_pass_at_k(job)
    return job


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


class RunFailed(RuntimeError):
    """A runner's way to report that one run failed and the others may go on."""


def _fault_types(runner: Runner) -> tuple[type[BaseException], ...]:
    """Faults one run may have without stopping the others (too many non-finite steps)."""
    if runner is not default_runner:
        return (RunFailed,)
    from hpt_dsl.train import RunFault

    return (RunFault, RunFailed)


def auto_parallel(n_jobs: int) -> tuple[int, int]:
    """(processes, torch threads per process) for ``n_jobs`` runs on this machine: one
    process with a GPU; on a CPU one process per core (at most 8, at most one per job),
    the cores shared out as threads."""
    import torch

    if torch.cuda.is_available():
        return 1, 0
    cores = os.cpu_count() or 1
    procs = max(1, min(cores, 8, n_jobs))
    return procs, max(1, cores // procs)


def run_jobs(
    jobs: Sequence[Job],
    runner: Runner = default_runner,
    parallel: int = 1,
    threads: int = 0,
    on_event: Callable[[str, Job], None] | None = None,
) -> list[tuple[Job, str]]:
    """Run every unfinished job; returns the (job, message) of runs that stopped on a fault.

    ``parallel`` > 1 runs that many processes at once (``runner`` must then be a
    module-level function); ``threads`` > 0 sets each run's torch threads. Any other error
    (bad input, Ctrl-C) stops everything and propagates. ``on_event(kind, job)`` hears
    "reuse", "start" (one process), "queue" (several), "done" and "failed"."""
    say = on_event or (lambda kind, job: None)
    faults = _fault_types(runner)
    failures: list[tuple[Job, str]] = []
    todo = []
    for job in jobs:
        if finished(job):
            say("reuse", job)
        else:
            todo.append(job)
    if parallel <= 1:
        for job in todo:
            say("start", job)
            try:
                _execute(job, runner, threads)
            except faults as e:
                failures.append((job, str(e)))
                say("failed", job)
                continue
            say("done", job)
        return failures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    stop = context.Event()  # set when the comparison stops: a worker then starts no queued job
    pool = ProcessPoolExecutor(parallel, mp_context=context, initializer=_init_worker, initargs=(stop,))
    old_term = _forward_sigterm(stop)
    try:
        futures = {}
        for job in todo:
            say("queue", job)
            futures[pool.submit(_execute_queued, job, runner, threads)] = job
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                fut.result()
            except faults as e:
                failures.append((job, str(e)))
                say("failed", job)
                continue
            say("done", job)
    except BaseException:
        stop.set()  # jobs already handed to a worker's queue must not start either
        pool.shutdown(wait=True, cancel_futures=True)  # running jobs checkpoint and stop on Ctrl-C
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    pool.shutdown(wait=True)
    return failures


_STOP: Any = None
"""In a worker process: the comparison's stop event (``_init_worker``)."""


def _init_worker(stop: Any) -> None:
    """A worker keeps the stop event and watches it: once the comparison stops, it sends
    itself SIGTERM, so that its run checkpoints and stops as on Ctrl-C (a second request
    within 3 s of a Ctrl-C it heard from the terminal counts as the same one)."""
    global _STOP
    _STOP = stop

    def watch() -> None:
        stop.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="compare-stop", daemon=True).start()


class NotStarted(RuntimeError):
    """A queued job that a worker did not start because the comparison was stopping."""


def _execute_queued(job: Job, runner: Runner, threads: int) -> Job:
    """``_execute`` in a worker, unless the comparison is stopping: the executor hands a worker
    its next job ahead of time, and a worker whose run just stopped on the signal would start it."""
    if _STOP is not None and _STOP.is_set():
        raise NotStarted(f"{job.label} seed {job.seed}: not started, the comparison stopped")
    return _execute(job, runner, threads)


def _forward_sigterm(stop: Any) -> Any:
    """A SIGTERM to the comparing process (``kill``, a job scheduler, ``timeout``) reaches only
    that process, not its workers: mark the comparison as stopping, which each worker watches
    (``_init_worker``: no queued job starts, a running one checkpoints and stops), then stop as
    on Ctrl-C, so that no worker trains on as an orphan. Returns the previous handler (None off
    the main thread, where none is installed)."""

    def handle(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:
        return None


# ----- the table ---------------------------------------------------------------------------------


def load_job(job: Job) -> RunData:
    run = runfiles.load_run(job.run_dir, label=job.label)
    run.seed = job.seed
    run.info.update(_read_json(job.run_dir / MARKER))
    return run


def _ms(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def summarize(runs: Sequence[RunData]) -> list[Row]:
    """One row per label (in first-seen order) with statistics over its seeds."""
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    rows = []
    for label, g in groups.items():
        row = Row(label, len(g), runs=g)
        last = [runfiles.eval_acc(r.evals[-1]) for r in g if r.evals]
        finals = [a for a in last if a is not None]
        row.acc = _ms(finals)
        pks = [runfiles.final_pass_at_k(r) for r in g]
        pks = [p for p in pks if p]
        if pks:
            k = max(set.intersection(*(set(p) for p in pks)), default=None)
            if k is not None:
                m = _ms([p[k] for p in pks])
                assert m is not None
                row.pass_k = (k, *m)
        curves = [runfiles.eval_accuracy(r) for r in g]
        shared = sorted(set.intersection(*(set(c) for c in curves))) if all(curves) else []
        if shared:
            means = [(sum(c[s] for c in curves) / len(curves), s) for s in shared]
            best = max(means, key=lambda t: (t[0], -t[1]))
            row.best_acc, row.best_step = best
        walls = [float(w) for w in (r.info.get("wall_s", r.info.get("seconds")) for r in g)
                 if isinstance(w, (int, float))]
        row.wall_s = sum(walls) / len(walls) if walls else None
        tps = [v for r in g for v in runfiles.step_series(r, "tokens_per_s").values() if v > 0]
        row.tokens_per_s = sum(tps) / len(tps) if tps else None
        rows.append(row)
    return rows


def header(rows: Sequence[Row]) -> tuple[str, ...]:
    """Column names; the pass@k column is named by its k when every row shares it."""
    ks = {r.pass_k[0] for r in rows if r.pass_k}
    pk = f"pass@{ks.pop()}" if len(ks) == 1 else "pass@k"
    return ("recipe", "seeds", "held-out acc", pk, "best step", "wall s", "tok/s")


def cells(row: Row, rows: Sequence[Row] = ()) -> tuple[str, ...]:
    """The row as the table's text cells (``rows``: the whole table, for the pass@k column)."""
    acc = f"{row.acc[0]:.3f} ± {row.acc[1]:.3f}" if row.acc else "-"
    pk = "-"
    if row.pass_k:
        pk = f"{row.pass_k[1]:.3f} ± {row.pass_k[2]:.3f}"
        if header(rows or [row])[3] == "pass@k":
            pk += f" (k={row.pass_k[0]})"
    best = "-"
    if row.best_step is not None and row.best_acc is not None:
        best = f"{row.best_step:g} ({row.best_acc:.3f})"
    wall = f"{row.wall_s:.0f}" if row.wall_s is not None else "-"
    tps = f"{row.tokens_per_s:.0f}" if row.tokens_per_s is not None else "-"
    return (row.label, str(row.seeds), acc, pk, best, wall, tps)


def to_markdown(rows: Sequence[Row]) -> str:
    head = header(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r, rows)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Numbers unformatted, one column per statistic."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["recipe", "seeds", "acc_mean", "acc_std", "pass_k", "pass_k_mean", "pass_k_std",
                    "best_step", "best_acc", "wall_s", "tokens_per_s"])  # pass_k: the k of pass@k
        for r in rows:
            w.writerow([
                r.label, r.seeds,
                *(r.acc if r.acc else ("", "")),
                *(r.pass_k if r.pass_k else ("", "", "")),
                "" if r.best_step is None else r.best_step, "" if r.best_acc is None else r.best_acc,
                "" if r.wall_s is None else round(r.wall_s, 2),
                "" if r.tokens_per_s is None else round(r.tokens_per_s, 1),
            ])


def rich_table(rows: Sequence[Row]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        title="mean ± std over seeds; the best step is picked on the held-out set (optimistic)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for i, h in enumerate(header(rows)):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(c.replace(" ± ", "±") for c in cells(r, rows)))
    return table


@dataclass
class Result:
    rows: list[Row]
    markdown: Path
    csv: Path
    figures: list[Path]
    failures: list[tuple[Job, str]] = field(default_factory=list)


def compare(
    recipes: Sequence[str],
    seeds: int = 3,
    overrides: Sequence[str] = (),
    out: Path | str = "compare",
    parallel: int = 1,
    threads: int = 0,
    runner: Runner = default_runner,
    on_event: Callable[[str, Job], None] | None = None,
    pass_k: int = 0,
) -> Result:
    """Plan, run (reusing finished runs), tabulate and plot; see the module docstring.
    ``parallel=0`` picks processes and threads with ``auto_parallel``. Runs that stopped
    on a fault are left out of the table and listed in ``Result.failures``."""
    from hpt_dsl.plot import plot_runs

    out = Path(out)
    jobs = plan(recipes, seeds, overrides, out, pass_k)
    if parallel <= 0:
        parallel, auto_threads = auto_parallel(sum(not finished(j) for j in jobs))
        threads = threads or auto_threads
    failures = run_jobs(jobs, runner, parallel, threads, on_event)
    rows = summarize([load_job(j) for j in jobs if finished(j)])
    md, csv_path = out / "compare.md", out / "compare.csv"
    md.write_text(to_markdown(rows), encoding="utf-8")
    write_csv(rows, csv_path)
    note = provenance(recipes, seeds, overrides, pass_k)
    figures = plot_runs(out_dir=out / "plots", runs=[r for row in rows for r in row.runs], note=note)
    return Result(rows, md, csv_path, figures, failures)


def provenance(recipes: Sequence[str], seeds: int, overrides: Sequence[str], pass_k: int) -> str:
    """Where, when and how the figures were measured: the machine, the date, the seeds and the
    command that reproduces them (``--jobs``, ``--threads`` and ``--out`` change no number)."""
    import datetime
    import platform

    import torch

    if torch.cuda.is_available():
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"{os.cpu_count()}-core {platform.machine()} CPU"
    command = ["hpt-dsl compare", *recipes, f"--seeds {seeds}", *(f"--set {o}" for o in overrides)]
    if pass_k:
        command.append(f"--pass-k {pass_k}")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"{machine}, {today}, seeds 0-{seeds - 1}: {' '.join(command)}"
