"""Compiled estimators against the same estimators written by hand in plain PyTorch.

    python bench/loss_overhead.py                       # CPU, B = 64, T = 1024
    python bench/loss_overhead.py --device cuda

For each estimator, on the same tensors (64 rows = 8 questions x (7 rollouts + 1
demonstration), T = 1024, random response lengths), times forward + backward of

    compiled:     program.prepare(...) then program.loss(prep, ...)  (with its metrics)
    hand-written: the advantages and the loss as one would write them for this estimator
                  alone (verl / TRL style, with the clip fraction and ratio mean metrics)

both "step" (advantages + loss + backward) and "loss" (loss + backward, advantages and
normalisers prepared once, as a trainer with several micro-batches uses them), plus the
peak memory of a step. The gradients of the two are checked to agree. Times are medians
of interleaved runs: wall time on CUDA, the process's CPU time on the CPU (use --threads 1
on a shared machine). Prints a table and
writes bench/results/loss_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from logprob_kernel import clock, peak_bytes, sync
from torch import Tensor

from hpt_dsl import compile_estimator

RESULTS = Path(__file__).resolve().parent / "results"
Batch = dict[str, Tensor]


def make_batch(B: int, T: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    per_q = 8
    demo = torch.arange(B) % per_q == per_q - 1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -2 * torch.rand(B, T, generator=g) * mask  # 0 on padding, as a learner returns them
    batch = dict(
        response_mask=mask,
        group_ids=torch.arange(B) // per_q,
        is_demo=demo,
        rewards=torch.where(demo, 1.0, (torch.rand(B, generator=g) < 0.4).float()),
        old_logprobs=old,
        lp=old + 0.2 * torch.randn(B, T, generator=g),
        values=torch.randn(B, T, generator=g) * mask,
    )
    return {k: v.to(device) for k, v in batch.items()}


# ----- the hand-written estimators ---------------------------------------------------------------


def group_adv(b: Batch, scale: bool = True) -> Tensor:
    """(R - mean) / (std + 1e-6) over each question's rollouts (unbiased std; groups < 2 -> 0)."""
    R, gid, w = b["rewards"], b["group_ids"], (~b["is_demo"]).float()
    Q = int(gid.max()) + 1
    n = torch.zeros(Q, device=R.device).index_add(0, gid, w)
    mu = torch.zeros(Q, device=R.device).index_add(0, gid, w * R) / n.clamp(min=1)
    a = R - mu[gid]
    if scale:
        var = torch.zeros(Q, device=R.device).index_add(0, gid, w * a * a) / (n - 1).clamp(min=1)
        a = a / (var.sqrt()[gid] + 1e-6)
    return torch.where(n[gid] >= 2, a, 0.0)[:, None]


def rollout_mask(b: Batch) -> Tensor:
    return (b["response_mask"] & ~b["is_demo"][:, None]).float()


def ppo_clip(lp: Tensor, b: Batch, A: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor]:
    """verl-style: pg = max(-A r, -A clip(r)); returns (pg, clipped, ratio)."""
    ratio = torch.exp(lp - b["old_logprobs"])
    pg1, pg2 = -A * ratio, -A * ratio.clamp(1 - lo, 1 + hi)
    return torch.maximum(pg1, pg2), (pg2 > pg1).detach(), ratio.detach()


def metrics(m: Tensor, clipped: Tensor, ratio: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        n = m.sum()
        return {"clip_frac": (clipped * m).sum() / n, "ratio_mean": (ratio * m).sum() / n}


def hand_grpo(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    m = pre["m"]
    pg, clipped, ratio = ppo_clip(lp, b, pre["A"], 0.2, 0.2)
    L = m.sum(1)
    metrics(m, clipped, ratio)
    return ((pg * m).sum(1) / L.clamp(min=1)).sum() / (L > 0).sum()


def hand_dapo(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    m = pre["m"]
    pg, clipped, ratio = ppo_clip(lp, b, pre["A"], 0.2, 0.28)
    metrics(m, clipped, ratio)
    return (pg * m).sum() / m.sum()


def hand_dr_grpo(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    m = pre["m"]
    pg, clipped, ratio = ppo_clip(lp, b, pre["A"], 0.2, 0.2)
    metrics(m, clipped, ratio)
    return (pg * m).sum() / (pre["L"] * (m.sum(1) > 0).sum())


def hand_cispo(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    m = pre["m"]
    ratio = torch.exp(lp - b["old_logprobs"]).detach()
    loss = -(ratio.clamp(max=1.28) * pre["A"] * lp * m).sum() / m.sum()
    metrics(m, ratio > 1.28, ratio)
    return loss


def hand_gspo(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    """GSPO: s_i = exp(mean_t log(pi / pi_old)); loss = mean_i max(-A s, -A clip(s, 1 - 3e-4, 1 + 4e-4))."""
    m, A = pre["m"], pre["A"][:, 0]
    L = m.sum(1)
    s = torch.exp(((lp - b["old_logprobs"]) * m).sum(1) / L.clamp(min=1))
    pg1, pg2 = -A * s, -A * s.clamp(1 - 3e-4, 1 + 4e-4)
    seq = (L > 0).float()
    with torch.no_grad():
        ((pg2 > pg1) * seq).sum() / seq.sum()
    return (torch.maximum(pg1, pg2) * seq).sum() / seq.sum()


def hand_sft(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    m = (b["response_mask"] & b["is_demo"][:, None]).float()
    return -(lp * m).sum() / m.sum()


def hand_hpt(lp: Tensor, b: Batch, pre: dict) -> Tensor:
    """if acc > 0 then grpo else sft: each question's rollouts (RL) or its demonstration (SFT)."""
    to_rl = pre["to_rl"]
    m_rl = rollout_mask(b) * to_rl[:, None]
    pg, clipped, ratio = ppo_clip(lp, b, pre["A"], 0.2, 0.2)
    L = m_rl.sum(1)
    metrics(m_rl, clipped, ratio)
    rl = ((pg * m_rl).sum(1) / L.clamp(min=1)).sum() / (L > 0).sum().clamp(min=1)
    m_sft = (b["response_mask"] & b["is_demo"][:, None]).float() * (1 - to_rl)[:, None]
    return rl - (lp * m_sft).sum() / m_sft.sum().clamp(min=1)


def hand_ppo(lp: Tensor, b: Batch, pre: dict, values: Tensor) -> tuple[Tensor, Tensor]:
    m = pre["m"]
    pg, clipped, ratio = ppo_clip(lp, b, pre["A"], 0.2, 0.2)
    metrics(m, clipped, ratio)
    v_old, ret = pre["v_old"], pre["ret"]
    v_clip = v_old + (values - v_old).clamp(-0.2, 0.2)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
    return (pg * m).sum() / m.sum(), 0.5 * (vf * m).sum() / m.sum()


def gae(b: Batch, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE over each response, the reward on its last token (padding skipped)."""
    mask = b["response_mask"]
    v = b["values"] * mask
    last = (mask * torch.arange(mask.shape[1], device=v.device)).argmax(1)
    r = torch.zeros_like(v).scatter_(1, last[:, None], b["rewards"][:, None])
    adv, nxt, run = torch.zeros_like(v), torch.zeros_like(v[:, 0]), torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        mt = mask[:, t]
        a = r[:, t] + gamma * nxt - v[:, t] + gamma * lam * run
        adv[:, t] = torch.where(mt, a, 0.0)
        nxt, run = torch.where(mt, v[:, t], nxt), torch.where(mt, a, run)
    return adv, adv + v


def hand_prepare(name: str, b: Batch) -> dict:
    with torch.no_grad():
        pre: dict = {"m": rollout_mask(b), "L": 64.0}
        if name in ("grpo", "dapo", "cispo", "gspo", "hpt"):
            pre["A"] = group_adv(b)
        if name == "dr_grpo":
            pre["A"] = group_adv(b, scale=False)
        if name == "hpt":
            R, gid, w = b["rewards"], b["group_ids"], (~b["is_demo"]).float()
            Q = int(gid.max()) + 1
            solved = torch.zeros(Q, device=R.device).index_add(0, gid, w * (R > 0.5).float())
            pre["to_rl"] = (solved > 0).float()[gid]
        if name == "ppo":
            pre["A"], pre["ret"] = gae(b)
            pre["v_old"] = b["values"]
        return pre


HAND: dict[str, Callable[..., object]] = {
    "grpo": hand_grpo, "dapo": hand_dapo, "dr_grpo": hand_dr_grpo, "cispo": hand_cispo, "gspo": hand_gspo,
    "sft": hand_sft, "hpt": hand_hpt, "ppo": hand_ppo,
}  # fmt: skip
RECIPES = {name: f"loss = {name}" for name in HAND}
RECIPES["hpt"] = "loss = if acc > 0 then grpo else sft"
RECIPES["ppo"] = "loss = ppo\ncritic { lr = 1e-3 }"


# ----- the measurement ---------------------------------------------------------------------------


def runners(name: str, b: Batch) -> dict[str, Callable[[], Tensor]]:
    """step / loss closures for the compiled and the hand-written estimator; each returns lp.grad."""
    program = compile_estimator(RECIPES[name])
    inputs = {k: v for k, v in b.items() if k != "lp"}
    prep = program.prepare(**inputs)
    pre = hand_prepare(name, b)

    def leaf() -> tuple[Tensor, Tensor]:
        return b["lp"].detach().clone().requires_grad_(), (b["values"] + 0.1).requires_grad_()

    def compiled(prepared: object | None) -> Tensor:
        lp, values = leaf()
        p = program.prepare(**inputs) if prepared is None else prepared
        out = program.loss(p, logprobs=lp, values=values if name == "ppo" else None)
        (out.loss + out.value_loss if out.value_loss is not None else out.loss).backward()
        return lp.grad

    def hand(prepared: dict | None) -> Tensor:
        lp, values = leaf()
        p = hand_prepare(name, b) if prepared is None else prepared
        if name == "ppo":
            loss, vloss = hand_ppo(lp, b, p, values)
            (loss + vloss).backward()
        else:
            HAND[name](lp, b, p).backward()  # type: ignore[union-attr]
        return lp.grad

    return {
        "compiled_step": lambda: compiled(None),
        "hand_step": lambda: hand(None),
        "compiled_loss": lambda: compiled(prep),
        "hand_loss": lambda: hand(pre),
    }


def median_times(
    fns: dict[str, Callable[[], Tensor]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each, the runs interleaved so that drifts in load hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    now = clock(device)
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = now()
            fn()
            sync(device)
            times[k].append(now() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--estimators", nargs="+", default=list(HAND))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "loss_overhead.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b = make_batch(args.batch, args.tokens, device)
    rows = []
    print(f"B={args.batch} T={args.tokens} device={device}: compiled / hand-written")
    head = ["estimator", "step ms", "x", "loss ms", "x", "peak MiB", "x", "|dgrad|"]
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, [10, 16, 6, 16, 6, 16, 6, 8], strict=True)))
    for name in args.estimators:
        fns = runners(name, b)
        diff = (fns["compiled_step"]() - fns["hand_step"]()).abs().max().item()
        t = median_times(fns, device, args.repeats if name != "ppo" else max(3, args.repeats // 10))
        mem_c, mem_h = peak_bytes(fns["compiled_step"], device), peak_bytes(fns["hand_step"], device)
        row = {
            "estimator": name, "device": device.type, "batch": args.batch, "tokens": args.tokens,
            "compiled_step_ms": t["compiled_step"] * 1e3, "hand_step_ms": t["hand_step"] * 1e3,
            "compiled_loss_ms": t["compiled_loss"] * 1e3, "hand_loss_ms": t["hand_loss"] * 1e3,
            "compiled_peak_mib": mem_c / 2**20, "hand_peak_mib": mem_h / 2**20, "max_grad_diff": diff,
        }  # fmt: skip
        row["step_time_ratio"] = row["compiled_step_ms"] / row["hand_step_ms"]
        row["loss_time_ratio"] = row["compiled_loss_ms"] / row["hand_loss_ms"]
        row["memory_ratio"] = mem_c / mem_h if mem_h else float("nan")
        rows.append(row)
        r = row
        print(
            f"{name:>10} {r['compiled_step_ms']:7.2f} /{r['hand_step_ms']:7.2f} {r['step_time_ratio']:6.2f}"
            f" {r['compiled_loss_ms']:7.2f} /{r['hand_loss_ms']:7.2f} {r['loss_time_ratio']:6.2f}"
            f" {r['compiled_peak_mib']:7.1f} /{r['hand_peak_mib']:7.1f} {r['memory_ratio']:6.2f} {diff:8.1e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
