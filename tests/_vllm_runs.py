"""What the vLLM training tests share (tests/test_vllm_multiproc.py, tests/test_vllm_server.py):
a small question file with a reward module that makes every sampled token matter, and the
training rows of a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARITY = '''
def parity(response, answer):
    """0 or 1 by the response's characters: rewards that differ between a question's samples,
    so that GRPO's advantages (and updates) depend on every sampled token."""
    return float(sum(map(ord, response)) % 2)
'''


def write_data(folder: Path, reward_module: str) -> Path:
    """``folder`` with train.jsonl (8 addition questions) and ``<reward_module>.py`` defining
    ``parity``; set ``data.reward=<reward_module>:parity`` with ``folder`` on PYTHONPATH."""
    rows = [{"question": f"What is {i + 2} + {3 * i + 1}?", "answer": str(4 * i + 3)} for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{reward_module}.py").write_text(PARITY)
    return folder


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The ``kind == "train"`` rows of ``run_dir/metrics.jsonl``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]
