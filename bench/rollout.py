"""Rollout throughput: generated tokens per second, the hf engine vs vLLM.

    .venv-vllm/bin/python bench/rollout.py                      # built-in tiny model, CPU
    python bench/rollout.py --model smollm2-135m --questions 64 --n 8 --max-new-tokens 256

Both engines sample the same prompts (the built-in task's train questions, through the
same prompt encoding the training loop uses) from the same weights, n samples per prompt
at temperature 1. Each engine gets one untimed warm-up call, then ``--repeats`` timed
calls with different seeds; the figure is generated tokens / wall seconds of each call,
and the median is reported. vLLM's start-up time is reported apart. Runs where vLLM is
installed (``scripts/setup-vllm`` on a CPU); the model sits on the GPU when there is one.
Prints a table and writes bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hpt_dsl.data import load_task
from hpt_dsl.models import load_model
from hpt_dsl.prompting import PromptCache
from hpt_dsl.rollout.base import RolloutEngine, SamplingParams
from hpt_dsl.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


def measure(
    engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams, repeats: int
) -> dict[str, Any]:
    """Warm up once, then time ``repeats`` calls; tokens/s of each call and their median."""
    engine.generate(prompts, params)
    rates, tokens = [], []
    for r in range(repeats):
        p = SamplingParams(
            n=params.n,
            temperature=params.temperature,
            max_new_tokens=params.max_new_tokens,
            seed=params.seed + r + 1,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(prompts, p)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        count = sum(len(x.token_ids) for x in out)
        rates.append(count / dt)
        tokens.append(count)
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": rates, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model.name: 'tiny' (built-in), an alias, or a path")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    args = ap.parse_args()

    settings = Settings()
    settings.model.name = args.model
    settings.model.dtype = args.dtype
    settings.rollout.sleep_between_steps = False  # time generation only
    workdir = Path(tempfile.mkdtemp(prefix="hpt-dsl-bench-"))
    model, tokenizer = load_model(settings.model, seed=0, workdir=workdir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    cache = PromptCache(tokenizer, settings.model)
    prompts = [cache.prompt(q) for q in load_task(settings).train[: args.questions]]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    results: dict[str, Any] = {}
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        if name == "hf":
            from hpt_dsl.rollout.hf import HFRolloutEngine

            engine: RolloutEngine = HFRolloutEngine(model, tokenizer, settings)
        elif name == "vllm":
            from hpt_dsl.rollout.vllm import make_engine

            engine = make_engine(settings, model, tokenizer)
        else:
            raise SystemExit(f"unknown engine {name!r}: use hf or vllm")
        start_s = time.perf_counter() - t0
        results[name] = {"start_s": start_s, **measure(engine, prompts, params, args.repeats)}
        engine.close()

    report = {
        "model": args.model,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "engines": results,
    }
    if "hf" in results and "vllm" in results:
        report["speedup"] = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    where = report["device"]
    print(f"{len(prompts)} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, {where}")
    print(f"{'engine':8} {'start s':>8} {'tokens/s':>10}   runs")
    for name, r in results.items():
        runs = " ".join(f"{x:.0f}" for x in r["runs_tokens_per_s"])
        print(f"{name:8} {r['start_s']:8.1f} {r['tokens_per_s']:10.0f}   {runs}")
    if "speedup" in report:
        print(f"vLLM / transformers: {report['speedup']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if device == "cpu" else "_gpu"
    (RESULTS / f"rollout{suffix}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
