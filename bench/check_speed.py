"""How fast ``hpt-dsl check`` answers, with and without a plugin (``use "my_components.py"``).

Prints, for each recipe, the wall time of the whole command (a fresh process, best and median
of N runs) and of the in-process check alone, and whether torch was imported (it must not
be: the checker reads a plugin's declarations without running it). Writes JSON.

    python bench/check_speed.py [--runs 7] [--out bench/results/check_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "recipes/hpt.hpt (no plugin)": ROOT / "recipes" / "hpt.hpt",
    "docs/examples/trust.hpt (a plugin)": ROOT / "docs" / "examples" / "trust.hpt",
}
IN_PROCESS = (
    "import sys, time; from hpt_dsl import check; t = time.perf_counter(); d = check(sys.argv[1]); "
    "print(time.perf_counter() - t, 'torch' in sys.modules, sum(x.is_error for x in d))"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "check_speed.json"))
    args = ap.parse_args()
    rows = []
    for label, path in RECIPES.items():
        walls, inner, torch_loaded = [], [], False
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hpt_dsl.cli.main", "check", str(path)], check=True,
                           capture_output=True, cwd=path.parent)  # fmt: skip
            walls.append(time.perf_counter() - t)
            out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(path)], check=True, capture_output=True,
                                 text=True, cwd=path.parent).stdout.split()  # fmt: skip
            inner.append(float(out[0]))
            torch_loaded |= out[1] == "True"
            assert out[2] == "0", f"{label} has errors"
        row = {
            "recipe": label, "command_best_s": min(walls), "command_median_s": statistics.median(walls),
            "check_best_s": min(inner), "check_median_s": statistics.median(inner), "torch_imported": torch_loaded,
        }  # fmt: skip
        rows.append(row)
        print(f"{label:38s} command {row['command_best_s']:.3f} s (median {row['command_median_s']:.3f}), "
              f"check alone {row['check_best_s'] * 1000:.1f} ms (median {row['check_median_s'] * 1000:.1f}), "
              f"torch imported: {torch_loaded}")  # fmt: skip
    write_result(args.out, "check_speed", "python bench/check_speed.py --runs " + str(args.runs), runs=args.runs,
                 rows=rows)


if __name__ == "__main__":
    main()
