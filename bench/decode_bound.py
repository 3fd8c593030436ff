"""A rollout engine's decode rate on a real checkpoint against what this machine allows.

    python bench/decode_bound.py                         # SmolLM2-135M, 16 sequences, 2 threads
    python bench/decode_bound.py --max-new-tokens 128 --repeats 5
    .venv-vllm/bin/python bench/decode_bound.py --engine vllm    # vLLM's CPU build, same prompts

A decode step of ``S`` sequences runs every linear layer of the model once on ``S`` rows
(the attention over the cache and the sampling come on top). Four bounds on the seconds
of one step, each measured here, on this machine, in this process:

    gemm bound      the step's own matrix products: every weight matrix of the model (the
                    output head included) applied to S rows (the weights stream from memory as
                    in the real forward pass), through the fastest of torch's CPU kernels for
                    each shape (the default BLAS, oneDNN, oneDNN on weights packed for S rows)
                    and in the faster of two layouts (one product per nn.Linear, or a Llama
                    layer's q/k/v and gate/up stacked into one product each, as
                    ``rollout.llama_step`` runs them); FLOPs/token and the GFLOP/s it reaches
    gemm + cache    the gemm bound plus the attention's reads of the KV cache at the read
                    bandwidth: keys and values of every layer, S rows, at the mean width of
                    the call (prompt + half the new tokens); a layer's products and its
                    attention run one after the other, so their bounds add
    memory bound    the bytes of all weights / the read bandwidth (a sum over 512 MB)
    peak bound      FLOPs of the step / the GFLOP/s of a 1024^3 float32 GEMM

The engine (``--engine``: hpt-dsl's transformers engine, or vLLM's CPU build run by
hpt-dsl's vLLM engine, weights synced from the same model) samples ``--questions`` GSM8K
questions (chat template, the SmolLM2 recipe's system prompt) ``--n`` times each, at
temperature 1, float32, with the end-of-sequence tokens switched off so that all ``S`` rows
run every step; its decode seconds are the time of a ``--max-new-tokens`` call minus that
of a one-token call (the prefill). The rate with end-of-sequence tokens on (rows leave as
they finish) is printed too. Bound and engine are measured in alternating rounds; medians
are reported. Prints a table and writes bench/results/decode_bound.json
(decode_bound_vllm.json for vLLM).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from hpt_dsl.data import load_task  # noqa: E402
from hpt_dsl.malloc import keep_freed_memory  # noqa: E402
from hpt_dsl.models import load_model  # noqa: E402
from hpt_dsl.prompting import PromptCache  # noqa: E402
from hpt_dsl.rollout import cpu_linear, llama_step  # noqa: E402
from hpt_dsl.rollout.base import SamplingParams  # noqa: E402
from hpt_dsl.rollout.hf import HFRolloutEngine  # noqa: E402
from hpt_dsl.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layouts(model: Any) -> dict[str, list[torch.Tensor]]:
    """The weight matrices of one decode step, per layout: "per layer" (each nn.Linear) and,
    for a model that ``llama_step`` decodes, "stacked" (q/k/v and gate/up concatenated)."""
    plain = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = {"per layer": plain}
    if llama_step.eligible(model):
        stacked = [model.get_output_embeddings().weight]
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            stacked += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight]
            stacked += [torch.cat([f.gate_proj.weight, f.up_proj.weight]), f.down_proj.weight]
        out["stacked"] = stacked
    return out


def gemm_step(model: Any, rows: int) -> tuple[dict[str, float], float]:
    """({"layout/kernel": seconds}, FLOPs) of one decode step's matrix products on ``rows``
    rows: per layout (``_layouts``), the weights grouped by shape, each group timed through
    torch's default kernel, oneDNN's and oneDNN's on packed weights (``cpu_linear``);
    "best" is the faster layout with the faster kernel for each of its groups."""
    kernels: dict[str, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
        "default": lambda w: functools.partial(torch.nn.functional.linear, weight=w)
    }
    if cpu_linear.available():
        kernels["onednn"] = lambda w: functools.partial(cpu_linear.linear, weight=w)
        kernels["packed"] = lambda w: cpu_linear.Packed(w, None, rows)
    out: dict[str, float] = {}
    best: list[float] = []
    flops = 0.0
    with torch.no_grad():
        for layout, weights in _layouts(model).items():
            flops = sum(2.0 * rows * w.numel() for w in weights)
            groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
            for w in weights:
                groups.setdefault(tuple(w.shape), []).append(w)
            per_group: list[list[float]] = []
            for (_, fan_in), ws in groups.items():
                x = torch.randn(rows, fan_in)
                row = []
                for make in kernels.values():
                    products = [make(w) for w in ws]
                    row.append(_timed(lambda ps=products, x=x: [p(x) for p in ps], 5))
                    del products
                per_group.append(row)
            for k, name in enumerate(kernels):
                out[f"{layout}/{name}"] = sum(t[k] for t in per_group)
            best.append(sum(min(t) for t in per_group))
    out["best"] = min(best)
    return out, flops


def read_bandwidth() -> float:
    """Bytes/s of a sum over a 512 MB float32 tensor (larger than any cache)."""
    x = torch.ones(128 * 1024 * 1024)
    return x.numel() * 4 / _timed(x.sum, 5)


def peak_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / _timed(lambda: a @ b, 10) / 1e9


def make_engine(name: str, model: Any, tokenizer: Any, settings: Settings) -> tuple[Any, Callable[[bool], None]]:
    """The rollout engine ``name`` on ``model`` and a switch for its end-of-sequence stops."""
    if name == "hf":
        engine = HFRolloutEngine(model, tokenizer, settings)
        eos = set(engine.eos_ids)

        def hf_stopping(stop: bool) -> None:
            engine.eos_ids = eos if stop else set()

        return engine, hf_stopping
    from hpt_dsl.rollout import vllm

    engine = vllm.make_engine(settings, model, tokenizer)
    stop_ids = engine.stop_token_ids

    def vllm_stopping(stop: bool) -> None:  # no stop ids: the engine tells vLLM to ignore the EOS too
        engine.stop_token_ids = stop_ids if stop else []

    return engine, vllm_stopping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of bound and engine")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="vllm: the CPU build, where installed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as in a training process (hpt_dsl.malloc)

    settings = Settings()
    settings.model.name = args.model
    settings.model.system_prompt = SYSTEM
    settings.data.train = str(ROOT / "data/train/gsm8k_train.jsonl")
    model, tokenizer = load_model(settings.model, seed=0, workdir=Path(tempfile.mkdtemp(prefix="hpt-dsl-bench-")))
    model.eval()
    cache = PromptCache(tokenizer, settings.model)
    prompts = [cache.prompt(q) for q in load_task(settings).train[: args.questions]]
    engine, stopping = make_engine(args.engine, model, tokenizer, settings)
    rows = args.questions * args.n
    steps = args.max_new_tokens - 1

    def call(tokens: int, seed: int, stop: bool) -> tuple[float, int]:
        stopping(stop)
        t0 = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(n=args.n, temperature=1.0, max_new_tokens=tokens, seed=seed))
        return time.perf_counter() - t0, sum(len(r.token_ids) for r in out)

    call(8, 0, False)  # warm-up
    rounds: list[dict[str, float]] = []
    for r in range(args.repeats):
        gemm, flops = gemm_step(model, rows)
        prefill_s, _ = call(1, r, False)
        full_s, _ = call(args.max_new_tokens, r, False)
        stop_s, stop_tokens = call(args.max_new_tokens, r, True)
        rounds.append(
            {
                **{f"gemm_{k}_s": v for k, v in gemm.items()},
                "step_s": (full_s - prefill_s) / steps,
                "prefill_s": prefill_s,
                "eos_tokens_per_s": stop_tokens / stop_s,
            }
        )
    bandwidth, peak = read_bandwidth(), peak_gflops()

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_s, gemm_s = med("step_s"), med("gemm_best_s")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = max(len(p) for p in prompts) + args.max_new_tokens / 2
    kv_bytes = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * head_dim * 4 * width
    bounds = {"gemm": gemm_s, "gemm + cache": gemm_s + kv_bytes / bandwidth, "memory": weight_bytes / bandwidth,
              "peak": flops / (peak * 1e9)}  # fmt: skip
    decode_tps = rows / step_s
    report = {
        "engine": args.engine, "model": args.model, "threads": args.threads, "sequences": rows,
        "max_new_tokens": args.max_new_tokens,
        "flops_per_token": flops / rows, "weight_bytes": weight_bytes, "kv_cache_bytes_read_per_step": kv_bytes,
        "read_gb_per_s": bandwidth / 1e9,
        "peak_gflops": peak, "gemm_gflops_at_rows": flops / gemm_s / 1e9,
        "gemm_step_s_by_kernel": {k[5:-2]: med(k) for k in rounds[0] if k.startswith("gemm_")},
        "bound_step_s": bounds, "bound_tokens_per_s": {k: rows / v for k, v in bounds.items()},
        "decode_step_s": step_s, "decode_tokens_per_s": decode_tps,
        "ratio": {k: decode_tps / (rows / v) for k, v in bounds.items()},
        "eos_tokens_per_s": med("eos_tokens_per_s"), "prefill_s": med("prefill_s"), "rounds": rounds,
    }  # fmt: skip
    print(f"{args.model}, {rows} sequences, float32, {args.threads} threads, {args.repeats} rounds (medians)")
    print(f"FLOPs per token {flops / rows / 1e9:.3f} G; weights {weight_bytes / 1e6:.0f} MB")
    print(f"{'bound':12} {'s/step':>8} {'tokens/s':>9}   how measured")
    how = {"gemm": f"the step's GEMMs at {rows} rows: {report['gemm_gflops_at_rows']:.0f} GFLOP/s (fastest below)",
           "gemm + cache": f"+ {kv_bytes / 1e6:.0f} MB of KV cache / {bandwidth / 1e9:.0f} GB/s read",
           "memory": f"weights / {bandwidth / 1e9:.0f} GB/s read",
           "peak": f"FLOPs / {peak:.0f} GFLOP/s (1024^3 GEMM)"}  # fmt: skip
    for k, v in bounds.items():
        print(f"{k:12} {v:8.4f} {rows / v:9.0f}   {how[k]}")
    print("GEMMs of a step: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in report["gemm_step_s_by_kernel"].items()))
    print(
        f"{args.engine} engine decode: {step_s:.4f} s/step, {decode_tps:.0f} tokens/s = "
        + ", ".join(f"{100 * r:.0f}% of the {k} bound" for k, r in report["ratio"].items())
    )
    print(f"with end-of-sequence on: {report['eos_tokens_per_s']:.0f} tokens/s (prefill {report['prefill_s']:.2f} s)")
    name = "decode_bound" if args.engine == "hf" else f"decode_bound_{args.engine}"
    write_result(ROOT / f"bench/results/{name}.json", name, "python " + " ".join(sys.argv), **report)


if __name__ == "__main__":
    main()
