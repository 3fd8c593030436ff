"""The stock estimators are the published losses: hand-written references from the papers'
formulas (and the released scripts' flags), compared with the compiled recipes in float64.

Each reference is written with plain Python loops over questions, rows and tokens, straight
from the formula in its docstring, and differentiated by autograd; the compiled program's
loss and gradient must equal it to 1e-6 (HPT Eq. 10-13, the released HPT and LUFFY scripts,
LUFFY's single normaliser, SRFT's entropy-aware terms, verl's whitening for PPO and
REINFORCE++, verl's clamped k3).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from hpt_dsl import load_recipe
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.estimator.program import LossProgram

D = torch.float64
EPS = 1e-6
LMAX = 16  # rollout.max_new_tokens of these recipes: the released scripts' token-sum divisor


def batch(seed: int, rewards: list[list[float]], demo_len: int | None = 5, T: int = 12) -> dict:
    """Questions with n rollouts each (rewards given) and one demonstration each (reward 1),
    unequal lengths >= 1, log-probs that move enough for PPO's clip to act."""
    g = torch.Generator().manual_seed(seed)
    gid, demo, R, lengths = [], [], [], []
    for q, rs in enumerate(rewards):
        for r in rs:
            gid.append(q)
            demo.append(False)
            R.append(r)
            lengths.append(int(torch.randint(1, T + 1, (), generator=g)))
        if demo_len is not None:
            gid.append(q)
            demo.append(True)
            R.append(1.0)
            lengths.append(min(T, demo_len + q))
    B = len(gid)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    old = -2.0 * torch.rand(B, T, generator=g, dtype=D) - 0.1
    lp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=D)).clamp(max=-1e-3)
    return dict(
        lp=lp, old=old, mask=mask, lengths=lengths, gid=gid, demo=demo, R=R,
        entropy=2.0 * torch.rand(B, T, generator=g, dtype=D),
    )  # fmt: skip


def program(text: str) -> LossProgram:
    return compile_recipe(load_recipe(text=text + f"\nrollout.max_new_tokens = {LMAX}\n"))


def run(prog: LossProgram, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    lp = b["lp"].clone().requires_grad_()
    out = prog(
        logprobs=lp, old_logprobs=b["old"], response_mask=b["mask"], rewards=torch.tensor(b["R"], dtype=D),
        group_ids=torch.tensor(b["gid"]), is_demo=torch.tensor(b["demo"]), entropy=b["entropy"],
    )  # fmt: skip
    out.loss.backward()
    return out.loss.detach(), lp.grad


def reference(fn, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    lp = b["lp"].clone().requires_grad_()
    loss = fn(lp, b)
    loss.backward()
    return loss.detach(), lp.grad


def assert_same(prog: LossProgram, fn, b: dict) -> None:
    loss, grad = run(prog, b)
    ref_loss, ref_grad = reference(fn, b)
    assert ref_grad.abs().sum() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)


def rows(b: dict, q: int, demo: bool) -> list[int]:
    return [i for i in range(len(b["gid"])) if b["gid"][i] == q and b["demo"][i] == demo]


def ppo_token(lp, old, A: float, eps: float = 0.2):
    r = torch.exp(lp - old)
    return torch.minimum(r * A, r.clamp(1 - eps, 1 + eps) * A)


def row_mean_entropy(b: dict, i: int) -> float:
    L = b["lengths"][i]
    return float(b["entropy"][i, :L].mean())


# ----- HPT -------------------------------------------------------------------------------------

HPT_REWARDS = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]


def ref_hpt_paper(lp, b: dict, gamma: float = 0.0):
    """HPT Eq. 10-13: L = (1/Q) sum_q L_q;  P_q <= gamma: L_q = -(1/|demo|) sum_t log pi(demo_t);
    else L_q = -(1/n) sum_i sum_t min(r A_i, clip(r, 0.8, 1.2) A_i), A_i = (R_i - mean)/(std + 1e-6)."""
    Q = len(set(b["gid"]))
    total = 0.0
    for q in sorted(set(b["gid"])):
        ro = rows(b, q, False)
        Rs = [b["R"][i] for i in ro]
        if statistics.mean(Rs) <= gamma:
            (d,) = rows(b, q, True)
            L = b["lengths"][d]
            total = total - lp[d, :L].sum() / L
        else:
            mu, sd = statistics.mean(Rs), statistics.stdev(Rs)
            s = 0.0
            for i in ro:
                A = (b["R"][i] - mu) / (sd + EPS)
                L = b["lengths"][i]
                s = s + ppo_token(lp[i, :L], b["old"][i, :L], A).sum()
            total = total - s / len(ro)
    return total / Q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hpt_is_the_papers_per_question_loss(seed: int) -> None:
    b = batch(seed, HPT_REWARDS)
    assert_same(program("loss = hpt"), ref_hpt_paper, b)


def test_hpt_weighs_each_question_one_over_q() -> None:
    """Doubling one SFT question's demonstration length halves its tokens' gradient but not its
    share: every question's loss has weight 1/Q, whichever branch it takes."""
    b = batch(3, HPT_REWARDS)
    _, grad = run(program("loss = hpt"), b)
    Q = 5
    for q in (1, 3):  # unsolved: SFT
        (d,) = rows(b, q, True)
        L = b["lengths"][d]
        torch.testing.assert_close(grad[d, :L], torch.full((L,), -1.0 / (Q * L), dtype=D), rtol=0, atol=1e-12)


def test_hpt_gamma_is_the_recipes_constant() -> None:
    b = batch(4, HPT_REWARDS)
    assert_same(program("let gamma = 0.25\nloss = hpt"), lambda lp, b: ref_hpt_paper(lp, b, 0.25), b)
    prog = compile_recipe(load_recipe(text="loss = hpt", overrides=["gamma=0.25"]))
    loss, _ = run(prog, b)
    torch.testing.assert_close(loss, reference(lambda lp, b: ref_hpt_paper(lp, b, 0.25), b)[0], rtol=0, atol=1e-6)


def ref_bonus(lp, b: dict, active: list[int], coef: float = 0.001):
    """- coef * (mean token entropy over the active rows' tokens): a constant of lp."""
    toks = [float(b["entropy"][i, t]) for i in active for t in range(b["lengths"][i])]
    return -coef * sum(toks) / len(toks) + 0.0 * lp.sum()


def ref_hpt_code(lp, b: dict, gamma: float = 0.0):
    """The released script: RL questions (P > gamma): sum over their rollout tokens of -(R_i - mean R) r,
    / max_new_tokens; SFT questions: token mean of -log pi over their demonstrations; plus
    -0.001 * the mean entropy over the active tokens (RL rollouts and SFT demonstrations)."""
    rl, sft_rows, active = 0.0, [], []
    for q in sorted(set(b["gid"])):
        ro = rows(b, q, False)
        Rs = [b["R"][i] for i in ro]
        if statistics.mean(Rs) > gamma:
            mu = statistics.mean(Rs)
            for i in ro:
                L = b["lengths"][i]
                rl = rl - ((b["R"][i] - mu) * torch.exp(lp[i, :L] - b["old"][i, :L])).sum()
            active += ro
        else:
            sft_rows += rows(b, q, True)
    active += sft_rows
    n_sft = sum(b["lengths"][i] for i in sft_rows)
    sft = -sum(lp[i, : b["lengths"][i]].sum() for i in sft_rows) / n_sft
    return rl / LMAX + sft + ref_bonus(lp, b, active)


@pytest.mark.parametrize("seed", [0, 1])
def test_hpt_code_is_the_released_script(seed: int) -> None:
    assert_same(program("loss = hpt_code"), ref_hpt_code, batch(seed, HPT_REWARDS))


# ----- LUFFY -----------------------------------------------------------------------------------


def luffy_advantages(b: dict, q: int, std: bool) -> dict[int, float]:
    """One group per question: its rollouts and its demonstration."""
    group = rows(b, q, False) + rows(b, q, True)
    Rs = [b["R"][i] for i in group]
    mu = statistics.mean(Rs)
    return {i: (b["R"][i] - mu) / (statistics.stdev(Rs) + EPS) if std else b["R"][i] - mu for i in group}


def ref_luffy_paper(lp, b: dict):
    """-(1/N_tok(rollouts + demos)) [sum_on min(r A, clip(r) A) + sum_off f(pi) A], f(x) = x/(x + 0.1)."""
    s, n_tok = 0.0, 0
    for q in sorted(set(b["gid"])):
        A = luffy_advantages(b, q, std=True)
        for i, a in A.items():
            L = b["lengths"][i]
            n_tok += L
            if b["demo"][i]:
                p = torch.exp(lp[i, :L])
                s = s + (p / (p + 0.1) * a).sum()
            else:
                s = s + ppo_token(lp[i, :L], b["old"][i, :L], a).sum()
    return -s / n_tok


@pytest.mark.parametrize("seed", [0, 1])
def test_luffy_is_the_papers_single_normaliser_loss(seed: int) -> None:
    assert_same(program("loss = luffy"), ref_luffy_paper, batch(seed, [[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]]))


def test_luffy_four_rollouts_of_four_tokens_and_a_twelve_token_demo() -> None:
    """Every token's gradient is divided by 28 = 16 + 12 (all tokens), not by 16 or 12."""
    b = batch(5, [[1, 0, 0, 0]], demo_len=12)
    for i in range(4):
        b["lengths"][i] = 4
    b["mask"] = torch.arange(12)[None] < torch.tensor(b["lengths"])[:, None]
    b["old"] = b["lp"].detach().clone()  # r = 1: no token clipped, the on-policy gradient is A exactly
    _, grad = run(program("loss = luffy"), b)
    A = luffy_advantages(b, 0, std=True)
    for i in range(4):
        torch.testing.assert_close(grad[i, :4], torch.full((4,), -A[i] / 28, dtype=D), rtol=0, atol=1e-12)
    p = torch.exp(b["lp"][4, :12])
    torch.testing.assert_close(grad[4, :12], -A[4] * 0.1 * p / (p + 0.1) ** 2 / 28, rtol=0, atol=1e-12)
    assert_same(program("loss = luffy"), ref_luffy_paper, b)


def ref_luffy_code(lp, b: dict):
    """The released scripts: A = R - mean over the group, no clip, -(sum_on A r + sum_off A f(pi)) / max_new_tokens,
    plus -0.001 * the mean entropy over every response token."""
    s = 0.0
    for q in sorted(set(b["gid"])):
        for i, a in luffy_advantages(b, q, std=False).items():
            L = b["lengths"][i]
            if b["demo"][i]:
                p = torch.exp(lp[i, :L])
                s = s + (p / (p + 0.1) * a).sum()
            else:
                s = s + (torch.exp(lp[i, :L] - b["old"][i, :L]) * a).sum()
    return -s / LMAX + ref_bonus(lp, b, list(range(len(b["gid"]))))


def test_luffy_code_is_the_released_script() -> None:
    assert_same(program("loss = luffy_code"), ref_luffy_code, batch(6, [[1, 0, 0, 1], [0, 0, 0, 0]]))


# ----- SRFT ------------------------------------------------------------------------------------


def ref_srft(lp, b: dict):
    """SFT on demos weighted 0.5 sg(exp(-H)), the demonstration off-policy (pi_beta = 1, A over
    rollouts + demo), rollouts: +0.1 sg(exp(H)) log pi if correct, -log pi if not; each a token mean."""
    demos = [i for i in range(len(b["gid"])) if b["demo"][i]]
    rollouts = [i for i in range(len(b["gid"])) if not b["demo"][i]]
    n_demo = sum(b["lengths"][i] for i in demos)
    n_roll = sum(b["lengths"][i] for i in rollouts)
    sft = sum(0.5 * math.exp(-row_mean_entropy(b, i)) * lp[i, : b["lengths"][i]].sum() for i in demos)
    off = 0.0
    for q in sorted(set(b["gid"])):
        for i, a in luffy_advantages(b, q, std=True).items():
            if b["demo"][i]:
                off = off + (a * torch.exp(lp[i, : b["lengths"][i]])).sum()
    on = 0.0
    for i in rollouts:
        w = 0.1 * math.exp(row_mean_entropy(b, i)) if b["R"][i] > 0.5 else -1.0
        on = on + w * lp[i, : b["lengths"][i]].sum()
    return -sft / n_demo - off / n_demo - on / n_roll


@pytest.mark.parametrize("seed", [0, 1])
def test_srft_is_the_papers_loss(seed: int) -> None:
    assert_same(program("loss = srft"), ref_srft, batch(seed, [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]]))


# ----- whitening over the step (PPO, REINFORCE++) -------------------------------------------------


def masked_whiten(x: list[float]) -> list[float]:
    """verl's masked_whiten over the given tokens: (x - mean) * rsqrt(unbiased var + 1e-8)."""
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x) * len(x) / (len(x) - 1)
    return [(v - mu) / math.sqrt(var + 1e-8) for v in x]


def step_inputs(b: dict) -> dict:
    return dict(
        response_mask=b["mask"], rewards=torch.tensor(b["R"], dtype=D), group_ids=torch.tensor(b["gid"]),
        is_demo=torch.tensor(b["demo"]), old_logprobs=b["old"], values=b["values"],
    )  # fmt: skip


def whiten_batch(seed: int) -> dict:
    b = batch(seed, [[1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 0]], demo_len=None)
    b["values"] = torch.randn(b["mask"].shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    return b


def gae_tokens(b: dict, i: int, gamma: float = 1.0, lam: float = 0.95) -> list[float]:
    L, v = b["lengths"][i], b["values"][i].tolist()
    adv, nxt_v, nxt_a = [0.0] * L, 0.0, 0.0
    for t in reversed(range(L)):
        delta = (b["R"][i] if t == L - 1 else 0.0) + gamma * nxt_v - v[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


@pytest.mark.parametrize("name", ["ppo", "reinforce_pp"])
def test_step_whitening_is_verls_and_survives_mini_batches(name: str) -> None:
    """PPO: GAE advantages, REINFORCE++: the token returns (R on every token), each whitened over
    every rollout token of the step; a mini-batch prepared with the step's moments gets exactly
    the step's advantages."""
    b = whiten_batch(7)
    B = len(b["gid"])
    prog = program(f"loss = {name}\ncritic {{ lr = 1e-3 }}")
    if name == "ppo":
        raw = [gae_tokens(b, i) for i in range(B)]
    else:
        raw = [[b["R"][i]] * b["lengths"][i] for i in range(B)]
    flat = masked_whiten([x for row in raw for x in row])
    expected = torch.zeros(b["mask"].shape, dtype=D)
    k = 0
    for i in range(B):
        for t in range(b["lengths"][i]):
            expected[i, t] = flat[k]
            k += 1
    step = prog.prepare(**step_inputs(b))
    adv = step.adv[0].expand(expected.shape) * b["mask"]
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-9)
    # two optimizer mini-batches of two questions each, with the step's moments
    for part in (torch.tensor([0, 1]), torch.tensor([2, 3])):
        sel = torch.isin(torch.tensor(b["gid"]), part)
        sub = {k: (v[sel] if isinstance(v, torch.Tensor) else v) for k, v in step_inputs(b).items()}
        prep = prog.prepare(**sub, step_moments=step.moments)
        got = prep.adv[0].expand(int(sel.sum()), expected.shape[1]) * b["mask"][sel]
        torch.testing.assert_close(got, expected[sel], rtol=0, atol=1e-9)
        alone = prog.prepare(**sub)  # without them, the mini-batch whitens itself: not the step's
        assert not torch.allclose(alone.adv[0].expand_as(got) * b["mask"][sel], expected[sel])


def test_gae_whitening_can_be_switched_off() -> None:
    b = whiten_batch(8)
    prog = program("loss = ppo adv=gae(1.0, 0.95, 0)\ncritic { lr = 1e-3 }")
    prep = prog.prepare(**step_inputs(b))
    for i in range(len(b["gid"])):
        L = b["lengths"][i]
        torch.testing.assert_close(prep.adv[0][i, :L], torch.tensor(gae_tokens(b, i), dtype=D), rtol=0, atol=1e-12)


# ----- k3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [-1e4, -30.0, -20.5, 0.3, 2.0, 30.0, 1e4])
def test_k3_is_clamped_as_verl(d: float) -> None:
    """kl = clamp(exp(d') - d' - 1, -10, 10), d' = clamp(d, -20, 20), d = log pi_ref - log pi_theta:
    finite at any log-ratio, equal to Schulman's k3 inside the clamps."""
    prog = program("loss = sft adv=const(0) on=rollouts kl=k3(1.0)")
    lp = torch.tensor([[-1.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.0 + d]], dtype=D)
    out = prog(logprobs=lp, ref_logprobs=ref, response_mask=torch.ones(1, 1, dtype=bool))
    out.loss.backward()
    dc = max(-20.0, min(20.0, d))
    k3 = min(10.0, math.exp(dc) - dc - 1)
    assert math.isfinite(out.loss.item()) and math.isfinite(lp.grad.item())
    assert out.loss.item() == pytest.approx(k3, rel=1e-12)
    live = abs(d) < 20 and math.exp(d) - d - 1 < 10
    assert lp.grad.item() == pytest.approx(1 - math.exp(d) if live else 0.0, abs=1e-12)


# ----- split invariance of the new forms -----------------------------------------------------------


@pytest.mark.parametrize("name", ["hpt", "hpt_code", "luffy", "luffy_code", "srft"])
@pytest.mark.parametrize("seed", [0, 1])
def test_micro_batch_split_invariance(name: str, seed: int) -> None:
    """Any split of the mini-batch into micro-batches gives the full-batch loss and gradient."""
    b = batch(seed, HPT_REWARDS)
    prog = program(f"loss = {name}")
    R, gid, demo = torch.tensor(b["R"], dtype=D), torch.tensor(b["gid"]), torch.tensor(b["demo"])
    prep = prog.prepare(response_mask=b["mask"], rewards=R, group_ids=gid, is_demo=demo, old_logprobs=b["old"])
    full, full_grad = run(prog, b)
    perm = torch.randperm(len(gid), generator=torch.Generator().manual_seed(seed))
    lp = b["lp"].clone().requires_grad_()
    total = 0.0
    for part in perm.split(4):
        out = prog.loss(prep, logprobs=lp[part], rows=part, entropy=b["entropy"][part])
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(float(full), abs=1e-9)
    torch.testing.assert_close(lp.grad, full_grad, rtol=0, atol=1e-9)
