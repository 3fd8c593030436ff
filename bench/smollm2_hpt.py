"""HPT on SmolLM2-135M on a CPU: seconds per step, rollout tokens/s, evaluation throughput.

    python bench/smollm2_hpt.py                          # recipes/smollm2_hpt.hpt, 3 steps
    python bench/smollm2_hpt.py --steps 5 --threads 2 --eval-questions 16
    python bench/smollm2_hpt.py --seed 1                 # train.seed (default: the recipe's)

Runs the shipped recipe (SmolLM2-135M-Instruct, GSM8K questions with demonstrations, the
math-verify reward, the transformers rollout engine) for ``--steps`` steps with its own
settings (4 questions x 4 rollouts of up to 128 tokens a step), evaluating before the first
step and after the last on ``--eval-questions`` GSM8K test questions (temperature 0.6,
top-p 0.95, up to 192 tokens). Reported from the run's metrics:

    s/step          wall seconds of a training step (median over steps after the first)
    rollout s       of which sampling; rollout tok/s = generated tokens / sampling seconds
    update s        log-prob passes + optimizer updates
    eval tok/s      generated tokens / generation seconds during evaluation
    eval samples/s  scored samples / evaluation wall seconds (generation + scoring)

The machine's load average is printed with the figures: other processes on the same cores
slow every figure down. Prints a table and writes bench/results/smollm2_hpt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from hpt_dsl.train import run_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEP_KEYS = ("step", "time/step", "time/rollout", "tokens_per_s", "response_length", "gate/sft", "gate/grpo",
             "loss", "acc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eval-questions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=None, help="train.seed (default: the recipe's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    overrides = [
        f"train.steps={args.steps}",
        "train.eval_every=0",
        f"data.max_test={args.eval_questions}",
        f"data.train={ROOT / 'data/train/gsm8k_train.jsonl'}",
        f"data.test={ROOT / 'data/eval/gsm8k.jsonl'}",
    ] + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = ROOT / "recipes" / "smollm2_hpt.hpt"
        result = run_recipe(recipe, overrides=overrides, output=Path(tmp) / "run", quiet=True)
        seed = json.loads((result.run_dir / "run.json").read_text())["seed"]
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "train"]
    evals = [r for r in lines if r["kind"] == "eval"]
    timed = steps[1:] or steps  # the first step includes one-off warm-up

    def med(key: str, rows: list[dict]) -> float:
        return statistics.median(r[key] for r in rows)

    figures = {
        "s/step": med("time/step", timed),
        "rollout s": med("time/rollout", timed),
        "rollout tok/s": med("tokens_per_s", timed),
        "update s": med("time/logprob", timed) + med("time/update", timed),
        "reward s": med("time/reward", timed),
        "eval tok/s": med("eval/tokens_per_s", evals),
        "eval samples/s": med("eval/samples_per_s", evals),
        "eval s": med("eval/seconds", evals),
    }
    out = {
        "recipe": "recipes/smollm2_hpt.hpt",
        "steps": args.steps,
        "seed": seed,
        "eval_questions": args.eval_questions,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "figures": figures,
        "per_step": [{k: r[k] for k in STEP_KEYS} for r in steps],
        "evals": [{k: r[k] for k in r if k.startswith("eval/") or k == "step"} for r in evals],
        "wall_s": result.wall_s,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_hpt.json").write_text(json.dumps(out, indent=2))
    print(f"SmolLM2-135M HPT on CPU (seed {seed}, {out['threads']} torch threads, load average "
          f"{load_before[0]:.1f} before, {out['load_average_after'][0]:.1f} after)")
    for k, v in figures.items():
        print(f"  {k:16s} {v:10.2f}")
    print(f"wrote {RESULTS / 'smollm2_hpt.json'}")


if __name__ == "__main__":
    main()
