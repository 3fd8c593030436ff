"""metrics.jsonl writing and truncation, the live view's text, the summary table."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hpt_dsl.report import Reporter, gate_text, is_timing, truncate_metrics


def test_lines_are_json_even_for_non_finite_values(tmp_path: Path) -> None:
    stream = io.StringIO()
    with Reporter(tmp_path, total_steps=2, json_logs=True, json_stream=stream) as rep:
        rep.evaluation(0, {"k": 1, "avg@1": 0.25, "pass@1": 0.25, "correct": [1, 0]})
        rep.step({"step": 1, "kind": "train", "loss": float("nan"), "grad_norm": float("inf"), "skipped": True})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "kind": "eval", "eval/k": 1, "eval/avg@1": 0.25, "eval/pass@1": 0.25}
    assert rows[1]["loss"] == "nan" and rows[1]["grad_norm"] == "inf" and rows[1]["skipped"] is True
    assert [json.loads(x) for x in stream.getvalue().splitlines()] == rows


def test_truncate_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": k} for s, k in [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "ki')
    truncate_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:4]


def test_gate_text_and_timing_keys() -> None:
    row = {"gate/sft": 0.75, "gate/grpo": 0.25, "gate/sft/nonfinite": 0.0, "loss": 1.0}
    assert gate_text(row) == "sft 75% grpo 25%"
    assert is_timing("time") and is_timing("time/update") and is_timing("tokens_per_s")
    assert not is_timing("loss") and not is_timing("timeout")


def test_summary_has_first_and_last_figures(tmp_path: Path) -> None:
    rep = Reporter(tmp_path, total_steps=2, quiet=True)
    rep.evaluation(0, {"k": 1, "avg@1": 0.0})
    rep.step({"step": 1, "kind": "train", "reward/mean": 0.1, "loss": 2.0, "gate/sft": 1.0, "tokens_per_s": 100.0})
    rep.step({"step": 2, "kind": "train", "reward/mean": 0.5, "loss": 1.0, "gate/sft": 0.5, "tokens_per_s": 300.0})
    rep.evaluation(2, {"k": 1, "avg@1": 0.5})
    table = rep.summary(tmp_path, 12.5, {"run folder": str(tmp_path)})
    cells = {table.columns[0]._cells[i]: (table.columns[1]._cells[i], table.columns[2]._cells[i])
             for i in range(table.row_count)}  # fmt: skip
    assert cells["held-out accuracy"] == ("0.000 (step 0)", "0.500 (step 2)")
    assert cells["share sft"] == ("100%", "50%")
    assert cells["rollout tokens/s (mean)"][1] == "200"
    assert cells["wall time"][1] == "12.5 s"
