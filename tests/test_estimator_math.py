"""The compiled loss is the math: autograd gradients equal the closed-form unified policy
gradient  1_stable * (pi_theta / pi_ref) * A_hat  (per log-prob, i.e. (1/pi_ref) * A_hat * grad pi_theta)
times the aggregation weight, in float64: for every stock estimator of the language's
prelude, and for component variants the prelude does not use (dual clip, KL estimators, ...).

The closed forms below are written with plain Python loops over rows and the standard
library's statistics, independently of the vectorised implementation.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch

from hpt_dsl import load_recipe
from hpt_dsl.estimator import LossProgram, compile_loss, compile_recipe, compile_spec
from hpt_dsl.logprob import token_logprobs
from hpt_dsl.recipe import Call, Compare, Const, EstimatorSpec, Gate, Joint, LossExpr, Stat, Sum, Term
from hpt_dsl.settings import CriticSettings, Settings

EPS = 1e-6

VARIANTS: dict[str, EstimatorSpec] = {
    "sft": EstimatorSpec(on="demos"),
    "reinforce": EstimatorSpec(adv=Call("reward")),
    "ppo": EstimatorSpec(mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("gae", (0.9, 0.8))),
    "grpo": EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), agg=Call("seq_mean_token_mean")
    ),
    "dr_grpo": EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)),
        denom="pi_old",
        adv=Call("group_mean"),
        agg=Call("token_sum_norm", (8.0,)),
    ),
    "dapo": EstimatorSpec(mask=Call("clip", (0.2, 0.28)), denom="pi_old", adv=Call("group_norm")),
    "dual_clip": EstimatorSpec(
        mask=Call("dual_clip", (0.2, 0.2, 1.5)), denom="pi_old", adv=Call("group_norm")
    ),
    "cispo": EstimatorSpec(mask=Call("cispo", (0.28,)), denom="pi_old", adv=Call("group_norm")),
    "gspo": EstimatorSpec(
        mask=Call("seq_clip", (0.05, 0.08)),
        denom="pi_old_seq",
        adv=Call("group_norm"),
        agg=Call("seq_mean_token_mean"),
    ),
    "rloo": EstimatorSpec(denom="pi_old", adv=Call("rloo"), agg=Call("seq_mean_token_sum")),
    "reinforce_pp": EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("batch_norm"), kl=Call("k3", (0.05,))
    ),
    "srft": EstimatorSpec(denom="1", adv=Call("group_norm"), on="demos", group="rollouts+demos"),
    "luffy_on": EstimatorSpec(
        mask=Call("clip", (0.2, 0.2)), denom="pi_old", adv=Call("group_norm"), group="rollouts+demos"
    ),
    "luffy_off": EstimatorSpec(
        denom="1", adv=Call("group_norm"), grad=Call("shaped", (0.1,)), on="demos", group="rollouts+demos"
    ),
    "kl_k1": EstimatorSpec(adv=Call("reward"), kl=Call("k1", (0.3,))),
    "kl_k2": EstimatorSpec(
        denom="pi_old", adv=Call("group_norm"), kl=Call("k2", (0.3,)), agg=Call("seq_mean_token_mean")
    ),
    "seq_clip_pi_old": EstimatorSpec(
        mask=Call("seq_clip", (0.1, 0.1)), denom="pi_old", adv=Call("group_norm")
    ),
}
VARIANTS = {k: replace(v, name=k) for k, v in VARIANTS.items()}

STOCK = [
    "sft",
    "reinforce",
    "ppo",
    "grpo",
    "dr_grpo",
    "dapo",
    "cispo",
    "gspo",
    "rloo",
    "reinforce_pp",
    "srft_offline",
    "srft_off",
    "luffy",
    "luffy_on",
    "luffy_off",
    "luffy_code_on",
    "luffy_code_off",
    "hpt_rl",
    "hpt_code_rl",
]
"""the prelude's estimators and sums of them; the entropy-weighted (srft, the *_code
forms with their entropy bonus) and the per-question ones (hpt) have closed forms of their
own in tests/test_estimator_faithful.py"""


def make_batch(
    seed: int, questions: int = 3, n: int = 4, demos: bool = True, T: int = 6, noise: float = 0.35
) -> dict:
    """A mini-batch: n rollouts + (optionally) one demonstration per question, random lengths
    (one zero-length row), 0/1 rewards, log-probs that move enough for clipping to happen."""
    g = torch.Generator().manual_seed(seed)
    gid, demo, rewards = [], [], []
    for q in range(questions):
        for _ in range(n):
            gid.append(10 + 7 * q)
            demo.append(False)
            rewards.append(float(torch.rand((), generator=g) < 0.5))
        if demos:
            gid.append(10 + 7 * q)
            demo.append(True)
            rewards.append(1.0)
    B = len(gid)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -2.5 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.05
    lp = old + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    lp = lp.clamp(max=-1e-3)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    # padding holds junk the compiler must ignore
    old = torch.where(mask, old, torch.tensor(float("nan"), dtype=torch.float64))
    ref = torch.where(mask, ref, torch.tensor(float("inf"), dtype=torch.float64))
    return dict(
        lp=lp,
        old=old,
        ref=ref,
        values=values,
        mask=mask,
        lengths=lengths.tolist(),
        group_ids=torch.tensor(gid),
        is_demo=torch.tensor(demo),
        rewards=torch.tensor(rewards, dtype=torch.float64),
    )


# ----- closed forms, by hand ---------------------------------------------------------------------------


def ref_advantages(spec: EstimatorSpec, b: dict, active: list[bool]) -> list[list[float]]:
    """A_hat per row and token, from the published formulas."""
    R = b["rewards"].tolist()
    gid = b["group_ids"].tolist()
    demo = b["is_demo"].tolist()
    B, T = b["mask"].shape
    pooled = [spec.group == "rollouts+demos" or not d for d in demo]
    out = []
    name = spec.adv.name
    for i in range(B):
        G = [R[j] for j in range(B) if pooled[j] and gid[j] == gid[i]]
        if name == "const":
            a = spec.adv.args[0]
        elif name == "reward":
            a = R[i]
        elif name == "group_norm":
            a = (R[i] - statistics.mean(G)) / (statistics.stdev(G) + EPS) if len(G) >= 2 else 0.0
        elif name == "group_mean":
            a = R[i] - statistics.mean(G) if len(G) >= 2 else 0.0
        elif name == "rloo":
            if len(G) < 2:
                a = 0.0
            elif pooled[i]:
                a = R[i] - (sum(G) - R[i]) / (len(G) - 1)
            else:
                a = R[i] - statistics.mean(G)
        elif name == "batch_norm":
            Bn = [R[j] for j in range(B) if pooled[j] and active[j]]
            a = (R[i] - statistics.mean(Bn)) / (statistics.stdev(Bn) + EPS)
        elif name == "token_whiten":  # every response token of an active row carries its return R
            toks = [R[j] for j in range(B) if pooled[j] and active[j] for _ in range(b["lengths"][j])]
            a = (R[i] - statistics.mean(toks)) / math.sqrt(statistics.variance(toks) + 1e-8)
        elif name == "gae":
            gae_rows = [ref_gae(R[j], b["values"][j].tolist(), b["lengths"][j], *spec.adv.args[:2])[0]
                        for j in range(B)]  # fmt: skip
            row = gae_rows[i]
            if len(spec.adv.args) < 3 or spec.adv.args[2]:  # whitened over the active rows' tokens
                toks = [x for j in range(B) if active[j] for x in gae_rows[j]]
                mu, sd = statistics.mean(toks), math.sqrt(statistics.variance(toks) + 1e-8)
                row = [(x - mu) / sd for x in row]
            out.append((row + [0.0] * T)[:T])
            continue
        else:
            raise AssertionError(name)
        out.append([a] * T)
    return out


def ref_gae(reward: float, values: list[float], length: int, gamma: float, lam: float) -> tuple[list, list]:
    """Schulman et al. GAE on one response: reward on its last token."""
    adv = [0.0] * length
    nxt_v, nxt_a = 0.0, 0.0
    for t in reversed(range(length)):
        r = reward if t == length - 1 else 0.0
        delta = r + gamma * nxt_v - values[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t] = nxt_a
        nxt_v = values[t]
    return adv, [a + v for a, v in zip(adv, values[:length], strict=False)]


def ref_agg(
    spec: EstimatorSpec, lengths: list[int], active: list[bool], scope: list[bool] | None = None,
    questions: list[int] | None = None,
) -> list[float]:  # fmt: skip
    """Aggregation weight of each token of row i (the same for all its tokens). The counts are
    over ``scope`` (the rows of a joint normaliser; default: the active rows), per question
    when ``questions`` (the rows' question ids) is given, then divided by the number of
    questions."""
    scope = active if scope is None else scope
    out = []
    for i, (L, a) in enumerate(zip(lengths, active, strict=True)):
        inside = [j for j in range(len(lengths)) if scope[j] and (questions is None or questions[j] == questions[i])]
        n_tok = sum(lengths[j] for j in inside)
        n_seq = sum(1 for j in inside if lengths[j] > 0)
        if not a or L == 0:
            x = 0.0
        elif spec.agg.name == "token_mean":
            x = 1 / n_tok
        elif spec.agg.name == "seq_mean_token_mean":
            x = 1 / (L * n_seq)
        elif spec.agg.name == "seq_mean_token_sum":
            x = 1 / n_seq
        elif spec.agg.name == "token_sum":
            x = 1 / spec.agg.args[0]
        else:
            x = 1 / (spec.agg.args[0] * n_seq)
        out.append(x / (len(set(questions)) if questions is not None else 1))
    return out


def selected(spec: EstimatorSpec, b: dict, weights: list[float] | None = None) -> list[bool]:
    """The rows a term is active on: those its ``on`` selects, with a non-zero gate weight."""
    demo = b["is_demo"].tolist()
    weights = weights if weights is not None else [1.0] * len(demo)
    sel = [(spec.on == "rollouts+demos") or (d == (spec.on == "demos")) for d in demo]
    return [s and w != 0 for s, w in zip(sel, weights, strict=True)]


def ref_grad(
    spec: EstimatorSpec, b: dict, weights: list[float] | None = None, scope: list[bool] | None = None,
    per_question: bool = False,
) -> torch.Tensor:  # fmt: skip
    """d loss / d log pi_theta(y_t) = -w_i * agg_i * 1_stable * (pi_theta / pi_ref) * f'(x) * A_hat
    (+ the KL term), per token; GSPO uses its sequence-level form. ``scope`` and
    ``per_question``: see ``ref_agg``."""
    B, T = b["mask"].shape
    weights = weights if weights is not None else [1.0] * B
    active = selected(spec, b, weights)
    adv = ref_advantages(spec, b, active)
    agg = ref_agg(spec, b["lengths"], active, scope, b["group_ids"].tolist() if per_question else None)
    lp, old, ref = b["lp"].tolist(), b["old"].tolist(), b["ref"].tolist()
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        L = b["lengths"][i]
        if not active[i] or L == 0:
            continue
        c = weights[i] * agg[i]
        s = math.exp(sum(lp[i][t] - old[i][t] for t in range(L)) / L)
        for t in range(L):
            A = adv[i][t]
            pi = math.exp(lp[i][t])
            if spec.denom == "pi_theta":
                pi_ref, rho = pi, 1.0
            elif spec.denom == "1":
                pi_ref, rho = 1.0, pi
            else:
                pi_ref = math.exp(old[i][t])
                rho = pi / pi_ref
            x = rho if spec.denom != "pi_theta" else lp[i][t]
            fprime = 1.0
            if spec.grad.name == "shaped":
                gam = spec.grad.args[0]
                fprime = gam / (x + gam) ** 2
            mask, margs = spec.mask.name, spec.mask.args
            stable = 1.0
            if mask in ("clip", "dual_clip"):
                lo, hi = margs[0], margs[1]
                if (A > 0 and rho > 1 + hi) or (A < 0 and rho < 1 - lo):
                    stable = 0.0
                ppo_objective = min(rho * A, min(max(rho, 1 - lo), 1 + hi) * A)
                if mask == "dual_clip" and A < 0 and ppo_objective < margs[2] * A:
                    stable = 0.0
            if mask == "seq_clip":
                lo, hi = margs
                if (A > 0 and s > 1 + hi) or (A < 0 and s < 1 - lo):
                    stable = 0.0
            if spec.denom == "pi_old_seq":
                # GSPO: J_i = W_i * A_i * s_i with W_i = sum_t c (the sequence's weight) and
                # d s_i / d log pi(y_t) = s_i / |y_i|
                W = c * L
                g = -stable * W * A * s / L
            elif mask == "cispo":
                g = -c * min(rho, 1 + margs[0]) * A
            else:
                g = -c * stable * (pi / pi_ref) * fprime * A
            if spec.kl is not None:
                d = ref[i][t] - lp[i][t]
                # k3 is clamped as verl's low_var_kl: no gradient where |d| > 20 or k3 > 10
                k3_live = abs(d) < 20 and math.exp(d) - d - 1 < 10
                dk = {"k1": 1.0, "k2": -d, "k3": 1.0 - math.exp(d) if k3_live else 0.0}[spec.kl.name]
                g += c * spec.kl.args[0] * dk
            out[i, t] = g
    return out


def run(spec_or_loss, b: dict, settings: Settings | None = None):
    if isinstance(spec_or_loss, LossProgram):
        prog = spec_or_loss
    elif isinstance(spec_or_loss, EstimatorSpec):
        prog = compile_spec(spec_or_loss, settings)
    else:
        prog = compile_loss(spec_or_loss, settings)
    lp = b["lp"].clone().requires_grad_()
    out = prog(
        logprobs=lp,
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        rewards=b["rewards"],
        group_ids=b["group_ids"],
        is_demo=b["is_demo"],
        response_mask=b["mask"],
        values=b["values"],
    )
    out.loss.backward()
    return out, lp.grad


def terms(loss: LossExpr) -> list[EstimatorSpec]:
    """The estimators of a sum of terms (or of one joint normaliser over a sum)."""
    if isinstance(loss, Joint):
        return terms(loss.loss)
    if isinstance(loss, Term):
        return [loss.estimator]
    assert isinstance(loss, Sum)
    return [spec for item in loss.items for spec in terms(item)]


@pytest.mark.parametrize("name", STOCK)
@pytest.mark.parametrize("seed", [0, 1])
def test_stock_estimators_of_the_prelude(name: str, seed: int) -> None:
    """Each prelude estimator, read by the language front end, compiles to its closed form."""
    recipe = load_recipe(text=f"loss = {name}\ncritic {{ lr = 1e-3 }}")
    specs = terms(recipe.loss)
    b = make_batch(seed, noise=2e-4 if name == "gspo" else 0.35)  # GSPO's clip range is +-4e-4
    out, grad = run(compile_recipe(recipe), b)
    union = None
    if isinstance(recipe.loss, Joint):  # one normaliser: the counts span every term's rows
        union = [any(col) for col in zip(*(selected(s, b) for s in specs), strict=True)]
    expected = sum(ref_grad(spec, b, scope=union) for spec in specs)
    assert torch.isfinite(out.loss) and expected.abs().sum() > 0
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_is_the_unified_policy_gradient(name: str, seed: int) -> None:
    spec = VARIANTS[name]
    b = make_batch(seed)
    out, grad = run(spec, b, Settings(critic=CriticSettings()))
    expected = ref_grad(spec, b)
    assert torch.isfinite(out.loss)
    assert expected.abs().sum() > 0  # the check is not vacuous
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "cispo", "dual_clip"])
def test_some_tokens_are_clipped_in_these_checks(name: str) -> None:
    """The random batches exercise both sides of each mask (else the check above proves little)."""
    fracs = [float(run(VARIANTS[name], make_batch(s))[0].metrics["clip_frac"]) for s in range(3)]
    assert max(fracs) > 0 and min(fracs) < 1


@pytest.mark.parametrize("name", ["sft", "grpo", "luffy_off", "cispo", "gspo", "reinforce_pp"])
def test_gradient_wrt_logits_through_the_kernel(name: str) -> None:
    """dL/dz_{t,v} = g_t * (onehot(y_t)_v - softmax(z_t)_v), g_t the closed form above."""
    spec = VARIANTS[name]
    b = make_batch(3)
    B, T = b["mask"].shape
    V = 11
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    lp, _ = token_logprobs(logits, targets, chunk=7)
    b["lp"] = lp.detach()
    noise = 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    b["old"] = torch.where(b["mask"], lp.detach() + noise, 0.0)
    prog = compile_spec(spec)
    out = prog(
        logprobs=lp,
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        rewards=b["rewards"],
        group_ids=b["group_ids"],
        is_demo=b["is_demo"],
        response_mask=b["mask"],
    )
    out.loss.backward()
    g = ref_grad(spec, b)
    p = torch.softmax(logits.detach(), dim=-1)
    onehot = torch.nn.functional.one_hot(targets, V).to(torch.float64)
    expected = g[..., None] * (onehot - p)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-6)


def test_hpt_gate_gradient() -> None:
    """if acc <= 0.25 then sft else grpo: SFT on the demonstrations of hard questions, GRPO on
    the rollouts of the others; each term normalised over its own active rows."""
    sft, grpo = VARIANTS["sft"], VARIANTS["grpo"]
    loss = Gate(((Compare("<=", Stat("acc"), Const(0.25)), Term(sft)),), Term(grpo))
    for seed in range(4):
        b = make_batch(seed, questions=4)
        R, gid, demo = b["rewards"].tolist(), b["group_ids"].tolist(), b["is_demo"].tolist()
        acc = {
            q: statistics.mean([R[j] for j in range(len(R)) if gid[j] == q and not demo[j]]) for q in set(gid)
        }
        to_sft = [1.0 if acc[q] <= 0.25 else 0.0 for q in gid]
        expected = ref_grad(sft, b, to_sft) + ref_grad(grpo, b, [1.0 - w for w in to_sft])
        out, grad = run(loss, b)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
        frac = sum(1.0 if acc[q] <= 0.25 else 0.0 for q in set(gid)) / len(set(gid))
        assert float(out.metrics["gate/sft"]) == pytest.approx(frac)
        assert float(out.metrics["gate/grpo"]) == pytest.approx(1 - frac)
        assert float(out.metrics["branch/acc <= 0.25"]) == pytest.approx(frac)


def test_soft_gate_gradient() -> None:
    """acc * grpo + (1 - acc) * sft: per-question weights scale each row's token coefficients."""
    from hpt_dsl.recipe import Arith, Scale, Sum

    sft, grpo = VARIANTS["sft"], VARIANTS["grpo"]
    loss = Sum((Scale(Stat("acc"), Term(grpo)), Scale(Arith("-", Const(1.0), Stat("acc")), Term(sft))))
    b = make_batch(7, questions=4)
    R, gid, demo = b["rewards"].tolist(), b["group_ids"].tolist(), b["is_demo"].tolist()
    acc = {q: statistics.mean([R[j] for j in range(len(R)) if gid[j] == q and not demo[j]]) for q in set(gid)}
    w = [acc[q] for q in gid]
    expected = ref_grad(grpo, b, w) + ref_grad(sft, b, [1 - x for x in w])
    _, grad = run(loss, b)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_hpt_per_question_gradient_is_the_unified_policy_gradient() -> None:
    """per_question(if acc > 0 then hpt_rl else sft): the closed form with every aggregation
    count taken within the question, divided by the number of questions."""
    recipe = load_recipe(text="loss = hpt")
    rl, sft = recipe.estimators["hpt_rl"], recipe.estimators["sft"]
    for seed in range(4):
        b = make_batch(seed, questions=4)
        b["lengths"][1] = 3  # a rollout of length 0 would not count as one of the question's n
        b["mask"][1, :3] = True
        b["old"][1, :3] = b["lp"][1, :3] - 0.1
        R, gid, demo = b["rewards"].tolist(), b["group_ids"].tolist(), b["is_demo"].tolist()
        acc = {q: statistics.mean([R[j] for j in range(len(R)) if gid[j] == q and not demo[j]]) for q in set(gid)}
        to_rl = [1.0 if acc[q] > 0 else 0.0 for q in gid]
        expected = ref_grad(rl, b, to_rl, per_question=True)
        expected += ref_grad(sft, b, [1 - w for w in to_rl], per_question=True)
        _, grad = run(compile_recipe(recipe), b)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
