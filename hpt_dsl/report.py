"""What a run shows and writes: metrics.jsonl, the live view, the closing summary.

``metrics.jsonl`` has one JSON object per line. A training step::

    {"step": 12, "kind": "train", "loss": ..., "loss/<term>": ..., "reward/mean": ...,
     "acc": ..., "gate/<term>": ..., "branch/<label>": ..., "clip_frac": ..., "kl": ...,
     "entropy": ..., "grad_norm": ..., "response_length": ..., "tokens_per_s": ...,
     "time/rollout": ..., "time/reward": ..., "time/logprob": ..., "time/update": ...,
     "time/step": ..., "time": ..., "skipped": false, ...}

An evaluation (before the first step, every ``train.eval_every`` steps, at the end)::

    {"step": 20, "kind": "eval", "eval/avg@1": ..., "eval/pass@1": ..., ...}

``Reporter`` writes those lines and drives the console: a rich progress bar with ETA and
the key figures (``--quiet``: nothing; ``--json-logs``: each line printed as JSON).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hpt_dsl.faults import write_fault

if TYPE_CHECKING:
    from hpt_dsl.trackers import Trackers

TIMING_KEYS = ("time", "time/")
"""Keys that differ between two runs of the same seed (wall-clock figures)."""


def is_timing(key: str) -> bool:
    return key == "time" or key.startswith("time/") or key in ("tokens_per_s", "train_tokens_per_s")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf / nan
    return v


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step`` (a resume repeats the later ones)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")  # a full disk here must not cost the lines kept
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    tmp.replace(path)


def gate_text(row: dict[str, Any]) -> str:
    """``sft 75% grpo 25%`` from the gate shares of a metrics line."""
    parts = [f"{k[5:]} {v:.0%}" for k, v in row.items() if k.startswith("gate/") and k.count("/") == 1]
    return " ".join(parts)


class Reporter:
    """Writes metrics lines and shows progress; a context manager around the run."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        quiet: bool = False,
        json_logs: bool = False,
        json_stream: TextIO | None = None,
        writes: bool = True,
        trackers: Trackers | None = None,
    ) -> None:
        self.writes = writes  # False on every process of a multi-process run but the first
        self.trackers = trackers  # hpt_dsl.trackers.Trackers: each line written goes to them too
        self.path = run_dir / "metrics.jsonl"
        quiet = quiet or not writes
        json_logs = json_logs and writes
        self.total = total_steps
        self.quiet = quiet
        self.json_logs = json_logs
        self.json_stream = json_stream or sys.stdout
        self.console = Console(stderr=True, highlight=False)
        self.progress: Progress | None = None
        self.task: Any = None
        self.last_eval: dict[str, Any] = {}
        self.first_eval: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] = []

    def __enter__(self) -> Reporter:
        if not self.quiet and not self.json_logs:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def start_at(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def _write(self, row: dict[str, Any]) -> None:
        if not self.writes:
            return
        line = json.dumps({k: _clean(v) for k, v in row.items()})
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as err:  # a torn last line is skipped by every reader and by a resume
            raise write_fault(f"the metrics of step {row.get('step')}", self.path, err,
                              then=f"Free some space, then --resume {self.path.parent}.") from err
        if self.json_logs:
            self.json_stream.write(line + "\n")
            self.json_stream.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def step(self, row: dict[str, Any]) -> None:
        self._write(row)
        self.rows.append(row)
        if self.progress is not None:
            acc = self.last_eval.get("acc")
            info = "  ".join(
                x
                for x in (
                    f"held-out acc {acc:.2f}" if acc is not None else "",
                    f"reward {row['reward/mean']:.2f}" if "reward/mean" in row else "",
                    gate_text(row),
                    f"loss {row['loss']:.3f}" if "loss" in row else "",
                    f"{row.get('tokens_per_s', 0):.0f} tok/s",
                    "SKIPPED (non-finite)" if row.get("skipped") else "",
                )
                if x
            )
            self.progress.update(self.task, completed=row["step"], info=info)

    def evaluation(self, step: int, result: dict[str, Any]) -> None:
        k = result.get("k", 1)
        acc = result.get(f"avg@{k}")
        row = {"step": step, "kind": "eval"}
        row.update({f"eval/{key}": v for key, v in result.items() if isinstance(v, (int, float))})
        self._write(row)
        self.last_eval = {"step": step, "acc": acc, **result}
        if self.first_eval is None:
            self.first_eval = self.last_eval
        if self.progress is None and not self.quiet and not self.json_logs:
            self.console.print(f"step {step}: held-out accuracy {acc:.3f}")

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warning(self, text: str) -> None:
        """A warning, shown even with ``--quiet`` (by the first process of a run only)."""
        if self.writes:
            self.console.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    def summary(self, run_dir: Path, wall_s: float, extra: dict[str, Any]) -> Table:
        """The closing table, then the paths in ``extra`` (one line each); printed unless quiet."""
        table = Table(title="hpt-dsl run", show_header=True, header_style="bold")
        table.add_column("")
        table.add_column("first", justify="right")
        table.add_column("last", justify="right")
        train_rows = [r for r in self.rows if r.get("kind") == "train"]
        if self.first_eval is not None:
            table.add_row(
                "held-out accuracy",
                _fmt(self.first_eval.get("acc")) + f" (step {self.first_eval['step']})",
                _fmt(self.last_eval.get("acc")) + f" (step {self.last_eval['step']})",
            )
        if train_rows:
            first, last = train_rows[0], train_rows[-1]
            for key, label in (
                ("reward/mean", "reward"),
                ("loss", "loss"),
                ("response_length", "response length"),
            ):
                if key in first or key in last:
                    table.add_row(label, _fmt(first.get(key)), _fmt(last.get(key)))
            for key in sorted({k for r in (first, last) for k in r if k.startswith("gate/") and k.count("/") == 1}):
                table.add_row(f"share {key[5:]}", _fmt(first.get(key), pct=True), _fmt(last.get(key), pct=True))
            tps = [r["tokens_per_s"] for r in train_rows if "tokens_per_s" in r]
            if tps:
                table.add_row("rollout tokens/s (mean)", "", f"{sum(tps) / len(tps):.0f}")
        table.add_row("wall time", "", f"{wall_s:.1f} s")
        if not self.quiet and not self.json_logs:
            self.console.print(table)
            for k, v in extra.items():  # paths: whole lines, never cut to the table's width
                self.console.print(f"{k}: {v}", soft_wrap=True)
        return table


def _fmt(v: Any, pct: bool = False) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0%}" if pct else f"{v:.3f}"
