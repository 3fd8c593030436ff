"""Peak memory, time and agreement of the fused log-prob path against the plain one.

    python bench/logprob_memory.py                 # V = 151,936, 8,192 tokens, hidden 896, float32, CPU
    python bench/logprob_memory.py --small         # V = 32,000, 1,024 tokens, hidden 256: a quick check
    python bench/logprob_memory.py --device cuda   # on a GPU (peak from torch.cuda)

From the last hidden states h (N x H), the output head W (V x H), targets and per-token
weights, forward and backward of sum(g * log p(y)) + sum(entropy):

    plain  logits = h W^T (N x V, float32), then the chunked log-softmax kernel
           (hpt_dsl.logprob.token_logprobs): the logits and their gradient are held
    fused  hpt_dsl.fused_logprob.fused_token_logprobs: chunks of tokens, each chunk's logits
           recomputed in the backward pass; never N x V

Each path runs in a fresh process. Peak memory is what the computation adds to the inputs:
on the CPU the process's peak resident set (VmHWM, reset just before) minus its resident set
at that moment; on CUDA torch.cuda.max_memory_allocated minus the memory allocated before.
Times are wall-clock seconds (and CPU seconds on the CPU) of one forward + backward, the
median of --repeats. Agreement: the largest difference of each output (log-probs, entropies,
dL/dh, dL/dW) over the plain path's largest magnitude. Prints a table and writes
bench/results/logprob_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"tokens": 8192, "vocab": 151_936, "hidden": 896}
SMALL = {"tokens": 1024, "vocab": 32_000, "hidden": 256}
OUTPUTS = ("logprobs", "entropy", "grad_hidden", "grad_head")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- one path, in its own process -------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set of this process (Linux: VmHWM); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Hidden states, head, targets and weights, built in place (no temporary copies)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, device="cpu").to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, device="cpu").mul_(2.0 / hidden**0.5)
    w = w.to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g, device="cpu").to(device)
    weight = torch.randn(tokens, generator=g, device="cpu").to(device)
    return {"h": h, "w": w, "y": y, "g": weight}


def _step(path: str, x: dict, chunk: int | None) -> dict[str, torch.Tensor]:
    """Forward and backward of one path; its outputs."""
    from hpt_dsl.fused_logprob import fused_token_logprobs
    from hpt_dsl.logprob import token_logprobs

    if path == "fused":
        lp, ent = fused_token_logprobs(x["h"], x["w"], x["y"], 1.0, True, chunk=chunk)
    else:
        logits = torch.nn.functional.linear(x["h"], x["w"])
        lp, ent = token_logprobs(logits[None], x["y"][None], 1.0, True)
        lp, ent = lp[0], ent[0]
        del logits
    ((lp * x["g"]).sum() + ent.sum()).backward()
    out = {"logprobs": lp.detach(), "entropy": ent.detach(), "grad_hidden": x["h"].grad, "grad_head": x["w"].grad}
    x["h"].grad = x["w"].grad = None
    return out


def worker(args: argparse.Namespace) -> None:
    """Run one path --repeats times; print its figures as JSON, save its outputs."""
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _step(args.worker, _inputs(64, 1000, 16, getattr(torch, args.dtype), device), None)  # load the kernels' code
    x = _inputs(args.tokens, args.vocab, args.hidden, getattr(torch, args.dtype), device)
    walls, cpus, peaks = [], [], []
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        out = {}
        sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            exact = _reset_peak_rss()
            base = _status_kib("VmRSS") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t, c = time.perf_counter(), time.process_time()
        out = _step(args.worker, x, args.chunk)
        sync(device)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        else:
            high = _status_kib("VmHWM") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peaks.append(high - base)
    save_file({k: v.float().cpu().contiguous() for k, v in out.items()}, args.save)
    print(json.dumps({"path": args.worker, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                      "peak_mib": max(peaks) / 2**20, "walls": walls}))  # fmt: skip


# ----- the comparison ----------------------------------------------------------------------------


def _run_path(path: str, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--save", str(save), "--device", args.device,
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--dtype", args.dtype, "--repeats", str(args.repeats)]  # fmt: skip
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--chunk", str(args.chunk)] if args.chunk else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"logprob_memory: the {path} path failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="V = 32,000, 1,024 tokens, hidden 256 (seconds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=None, help="tokens per chunk of the fused path (default: its own)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "logprob_memory.json"))
    ap.add_argument("--worker", choices=["plain", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in (SMALL if args.small else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        worker(args)
        return
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_result

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("plain", "fused"):
            rows[path] = _run_path(path, args, Path(tmp) / f"{path}.safetensors")
            print(f"{path:>6}: peak {rows[path]['peak_mib']:9.1f} MiB  wall {rows[path]['wall_s']:7.2f} s  "
                  f"cpu {rows[path]['cpu_s']:7.2f} s", flush=True)  # fmt: skip
        ref = load_file(str(Path(tmp) / "plain.safetensors"))
        mine = load_file(str(Path(tmp) / "fused.safetensors"))
        errors = {k: float((mine[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max())
                  for k in OUTPUTS}  # fmt: skip
    plain, fused = rows["plain"], rows["fused"]
    ratios = {"memory": fused["peak_mib"] / plain["peak_mib"], "wall": fused["wall_s"] / plain["wall_s"],
              "cpu": fused["cpu_s"] / plain["cpu_s"]}  # fmt: skip
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"\nV = {args.vocab:,}, {args.tokens:,} tokens, hidden {args.hidden}, {args.dtype}, {args.device}, "
          f"forward + backward with entropy (float32 logits: {logits_mib:,.0f} MiB)")  # fmt: skip
    print(f"{'':>14}{'plain':>12}{'fused':>12}{'fused/plain':>14}")
    print(f"{'peak MiB':>14}{plain['peak_mib']:12.1f}{fused['peak_mib']:12.1f}{ratios['memory']:14.3f}")
    print(f"{'wall s':>14}{plain['wall_s']:12.2f}{fused['wall_s']:12.2f}{ratios['wall']:14.3f}")
    print(f"{'cpu s':>14}{plain['cpu_s']:12.2f}{fused['cpu_s']:12.2f}{ratios['cpu']:14.3f}")
    print("max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/logprob_memory.py", *sys.argv[1:]])
    write_result(args.out, "logprob_memory", command, device=args.device, tokens=args.tokens, vocab=args.vocab,
                 hidden=args.hidden, dtype=args.dtype, threads=args.threads or torch.get_num_threads(),
                 repeats=args.repeats, chunk=args.chunk, plain=plain, fused=fused, ratios=ratios,
                 max_rel_diff=errors)  # fmt: skip


if __name__ == "__main__":
    main()
