"""Peak memory and time of the log-prob kernel (from logits) against the naive log_softmax + gather.

    python bench/logprob_kernel.py                  # CPU, V = 32k and 152k
    python bench/logprob_kernel.py --device cuda --batch 4 --tokens 1024

Forward and backward (log-probs, and log-probs with the entropy), float32 and bf16
logits. Times are medians: wall time on CUDA, the process's CPU time on the CPU. Peak
memory is what the computation allocates on top of the logits it is given: on CUDA
torch.cuda.max_memory_allocated, on CPU the profiler's allocation timeline.
Prints a table and writes bench/results/logprob_kernel.json. (The fused path, which never
builds the logits, is bench/logprob_memory.py.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hpt_dsl.logprob import naive_token_logprobs, token_logprobs

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak of the memory ``fn`` allocates beyond what was live before it ran."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        fn()
    live = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        name = str(action).rsplit(".", 1)[-1]
        live += size if name == "CREATE" else -size if name == "DESTROY" else 0
        peak = max(peak, live)
    return peak


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA (after a synchronisation); on the CPU the process's own CPU time,
    which other programs on a shared machine do not inflate (run with --threads 1)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()
    now, times = clock(device), []
    for _ in range(repeats):
        sync(device)
        t = now()
        fn()
        sync(device)
        times.append(now() - t)
    return statistics.median(times)


def run(batch: int, tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, entropy: bool,
        repeats: int) -> dict:  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, generator=g).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (batch, tokens), generator=g).to(device)
    w = torch.randn(batch, tokens, generator=g).to(device)

    def lean() -> None:
        lp, h = token_logprobs(logits, targets, with_entropy=entropy)
        loss = (lp * w).sum() + (h.sum() if h is not None else 0.0)
        loss.backward()
        logits.grad = None

    def naive() -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        loss = (logp.gather(-1, targets[..., None]).squeeze(-1) * w).sum()
        if entropy:
            loss = loss - (logp.exp() * logp).sum()
        loss.backward()
        logits.grad = None

    with torch.no_grad():  # the two paths agree
        diff = (token_logprobs(logits, targets)[0] - naive_token_logprobs(logits, targets)).abs().max().item()
    lean()
    row = {
        "batch": batch, "tokens": tokens, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
        "entropy": entropy, "device": device.type, "max_abs_diff": diff,
        "logits_grad_mib": batch * tokens * vocab * logits.element_size() / 2**20,
        "lean_peak_mib": peak_bytes(lean, device) / 2**20,
        "naive_peak_mib": peak_bytes(naive, device) / 2**20,
        "lean_s": median_seconds(lean, device, repeats), "naive_s": median_seconds(naive, device, repeats),
    }  # fmt: skip
    row["memory_ratio"] = row["lean_peak_mib"] / row["naive_peak_mib"]
    row["time_ratio"] = row["lean_s"] / row["naive_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "logprob_kernel.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for vocab in args.vocab:
        for dtype in (torch.float32, torch.bfloat16):
            for entropy in (False, True):
                rows.append(run(args.batch, args.tokens, vocab, dtype, device, entropy, args.repeats))
                r = rows[-1]
                print(
                    f"V={vocab:>7} {r['dtype']:>8} entropy={entropy!s:>5}"
                    f"  peak MiB lean {r['lean_peak_mib']:8.1f} naive {r['naive_peak_mib']:8.1f}"
                    f" (x{r['memory_ratio']:.2f})  time ms lean {r['lean_s'] * 1e3:8.1f}"
                    f" naive {r['naive_s'] * 1e3:8.1f} (x{r['time_ratio']:.2f}) diff {r['max_abs_diff']:.0e}"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
