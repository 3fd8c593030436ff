"""A benchmark's result file: one JSON object with what was run, when and where.

    write_result(path, "check_speed", command, runs=7, rows=[...])

writes ``{"benchmark", "date" (UTC), "machine", "command", **fields}`` to ``path`` (its
folder made if need be) and prints where it went. It is strict JSON: a figure that was not
measured (NaN) or is infinite is written as null.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def write_result(path: str | Path, benchmark: str, command: str, **fields: Any) -> None:
    """Write the result of ``benchmark`` (run as ``command``) with ``fields`` to ``path``."""
    result = {
        "benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "command": command, **fields,
    }  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_strict(result), indent=2, allow_nan=False))
    print(f"wrote {path}")


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
