"""A benchmark's result file: one JSON object with what was run, when and where.

    write_result(path, "check_speed", command, runs=7, rows=[...])

writes ``{"benchmark", "date" (UTC), "machine", "command", **fields}`` to ``path`` (its
folder made if need be) and prints where it went.
"""

from __future__ import annotations

import json
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
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
