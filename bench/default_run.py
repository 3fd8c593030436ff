"""The default run over seeds: ``hpt-dsl run recipes/hpt.hpt --set train.seed=S`` for S in 0..4.

Prints one row per seed (wall time of the whole command, figures included; held-out accuracy
at the end and its best; the gate's SFT share in the first and the last 25 steps) and the
spread over seeds, and writes JSON. Runs are deterministic on one CPU but not across CPUs:
the figures of another machine differ.

    python bench/default_run.py [--seeds 0 1 2 3 4] [--recipe recipes/hpt.hpt] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parent.parent


def one(recipe: str, seed: int, sets: list[str], out: Path) -> dict[str, float]:
    args = [sys.executable, "-m", "hpt_dsl.cli.main", "run", recipe, "--output", str(out),  # as a user runs it
            "--set", f"train.seed={seed}", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    sft = [k for k in train[0] if k.startswith("gate/") and k.endswith("sft")]
    share = (lambda part: statistics.mean(r.get(sft[0], 0.0) for r in part)) if sft else (lambda part: float("nan"))
    return {
        "seed": seed, "wall_s": wall, "final_acc": evals[-1]["eval/pass@1"],
        "best_acc": max(r["eval/pass@1"] for r in evals), "sft_share_first": share(train[:25]),
        "sft_share_last": share(train[-25:]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--recipe", default="recipes/hpt.hpt")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default_run.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'seed':>4} {'wall s':>7} {'final acc':>9} {'best acc':>8} {'SFT share first 25':>18} {'last 25':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            r = one(args.recipe, seed, args.sets, Path(tmp) / f"seed{seed}")
            rows.append(r)
            print(f"{seed:>4} {r['wall_s']:>7.1f} {r['final_acc']:>9.3f} {r['best_acc']:>8.3f} "
                  f"{r['sft_share_first']:>18.0%} {r['sft_share_last']:>8.0%}", flush=True)  # fmt: skip
    finals = [r["final_acc"] for r in rows]
    summary = {
        "median_final_acc": statistics.median(finals), "min_final_acc": min(finals), "max_final_acc": max(finals),
        "mean_final_acc": statistics.mean(finals), "std_final_acc": statistics.pstdev(finals),
        "max_wall_s": max(r["wall_s"] for r in rows),
    }  # fmt: skip
    s = summary
    print(f"final held-out accuracy: median {s['median_final_acc']:.3f}, min {s['min_final_acc']:.3f}, "
          f"max {s['max_final_acc']:.3f} (mean {s['mean_final_acc']:.3f} ± {s['std_final_acc']:.3f}); "
          f"slowest run {s['max_wall_s']:.1f} s")  # fmt: skip
    command = " ".join(["python bench/default_run.py", "--recipe", args.recipe, "--seeds", *map(str, args.seeds),
                        *[f"--set {s}" for s in args.sets]])  # fmt: skip
    write_result(args.out, "default_run", command, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
