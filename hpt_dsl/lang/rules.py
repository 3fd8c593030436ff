"""Semantic rules that look at more than one component, at settings, or at the whole loss,
and what a checked loss needs at run time.

Estimator rules (``check_estimator``):
    E020  denom=pi_old / pi_old_seq on demonstrations (they have no old-policy log-probs)
    E024  cispo without denom=pi_old; seq_clip without denom=pi_old_seq;
          a group advantage for demonstrations that are not in the group
    W031  clip / dual_clip with denom=pi_theta (the ratio is identically 1)
    E021  a group advantage with rollout.n = 1
    E022  adv=gae without a ``critic { }`` block
    W032  knobs with no effect: a clip-family mask when pi_old always equals pi_theta
          (one epoch, one mini-batch, learner log-probs); grad=shaped with denom=pi_theta;
          a KL coefficient of 0
Gate rules:
    W030  a branch that can never be taken (reach.py)
    E023  a gate on a rollout statistic in a recipe where no estimator uses rollouts
Recipe rules (``check_recipe``):
    W032  pi_old from engine log-probs under top_p / top_k sampling
    E045  dynamic sampling with rollout.n = 1; rollout.overlong_cache > rollout.max_new_tokens
    E046  rollout.engine = vllm_server without a valid rollout.server ("host:port")
    W032  dynamic sampling, overlong shaping or truncation masking in a recipe without rollouts
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpt_dsl.lang import reach
from hpt_dsl.lang.components import CLIP_MASKS, GROUP_ADVANTAGES, show
from hpt_dsl.lang.plugins import Plugin
from hpt_dsl.recipe import (
    OLD_DENOMS,
    Compare,
    Cond,
    Const,
    EstimatorSpec,
    LossExpr,
    Needs,
    estimator_needs,
    num,
    show_cond,
    stats_used,
    terms,
)
from hpt_dsl.settings import Settings

if TYPE_CHECKING:
    from hpt_dsl.lang.check import Checker, EstV, GateUse
    from hpt_dsl.lang.diagnostics import Sink


def check_estimator(ck: Checker, est: EstV, s: EstimatorSpec) -> None:
    sink = ck.sink
    on_demos = s.on in ("demos", "rollouts+demos")
    if on_demos and s.denom in OLD_DENOMS:
        sink.error(
            "E020",
            f"denom={s.denom} on demonstrations: demonstrations have no old-policy log-probs",
            ck.where(est, "denom", "on"),
            hint="use denom=1 (off-policy, as in LUFFY and SRFT) or denom=pi_theta (as in SFT)",
        )
    if s.mask.name == "cispo" and s.denom != "pi_old":
        sink.error(
            "E024",
            f"mask={show(s.mask)} weighs log π_θ by the clipped ratio π_θ/π_old; it needs denom=pi_old",
            ck.where(est, "denom", "mask"),
            hint="write denom=pi_old",
        )
    if s.mask.name == "seq_clip" and s.denom != "pi_old_seq":
        sink.error(
            "E024",
            f"mask={show(s.mask)} clips GSPO's sequence ratio; it needs denom=pi_old_seq",
            ck.where(est, "denom", "mask"),
            hint="write denom=pi_old_seq, or use mask=clip(...) for a per-token clip",
        )
    if s.mask.name in ("clip", "dual_clip") and s.denom == "pi_theta":
        sink.warning(
            "W031",
            f"mask={show(s.mask)} with denom=pi_theta does nothing: the ratio π_θ/π_θ is identically 1",
            ck.where(est, "mask", "denom"),
            hint="use denom=pi_old to clip the importance ratio, or mask=none",
        )
    if s.adv.name in GROUP_ADVANTAGES and on_demos and s.group == "rollouts":
        sink.error(
            "E024",
            f"adv={show(s.adv)} on demonstrations, but group=rollouts leaves them out of every group",
            ck.where(est, "group", "on", "adv"),
            hint="write group=rollouts+demos",
        )
    if s.grad.name == "shaped" and s.denom == "pi_theta":
        sink.warning(
            "W032",
            f"grad={show(s.grad)} has no effect with denom=pi_theta: the shaped ratio is constant, "
            "so it only rescales the gradient",
            ck.where(est, "grad", "denom"),
            hint="shaping acts on π_θ/π_ref: use denom=1 (as LUFFY) or denom=pi_old",
        )
    if s.kl is not None and s.kl.args and s.kl.args[0] == 0:
        sink.warning(
            "W032",
            f"kl={show(s.kl)} has no effect (its coefficient is 0)",
            ck.where(est, "kl"),
            hint="remove it, or write kl=none",
        )
    if ck.settings is not None:
        _check_with_settings(ck, est, s, ck.settings)


def _check_with_settings(ck: Checker, est: EstV, s: EstimatorSpec, st: Settings) -> None:
    sink = ck.sink
    if s.adv.name in GROUP_ADVANTAGES and st.rollout.n == 1 and s.group == "rollouts":
        sink.error(
            "E021",
            f"adv={show(s.adv)} with rollout.n = 1: every group holds one rollout, "
            "so the advantage is always 0",
            ck.where(est, "adv"),
            hint="sample several rollouts per question, e.g. `rollout { n = 8 }`, "
            "or use adv=reward or adv=batch_norm",
        )
    if s.adv.name == "gae" and st.critic is None:
        sink.error(
            "E022",
            f"adv={show(s.adv)} needs a critic (value model), and this recipe has none",
            ck.where(est, "adv"),
            hint="add the line `critic { lr = 1e-3 }`",
        )
    single_update = (
        st.train.epochs == 1 and st.train.mini_batches == 1 and st.rollout.old_logprobs == "learner"
    )
    if s.mask.name in CLIP_MASKS and s.denom in OLD_DENOMS and single_update:
        sink.warning(
            "W032",
            f"mask={show(s.mask)} has no effect in this run: with one epoch and one mini-batch "
            "per rollout batch "
            "and learner log-probs, π_old equals π_θ at the update, so the ratio is always 1",
            ck.where(est, "mask"),
            hint="take several optimizer steps per rollout batch "
            "(train.mini_batches = 4 or train.epochs = 2), "
            "or write mask=none",
        )


def check_reachable(ck: Checker, use: GateUse) -> None:
    if ck.settings is None:
        return
    conds = [c for c, _ in use.conds]
    dead, else_dead = reach.dead_branches(conds, ck.settings.rollout.n, ck.settings.train.steps)
    ranges = _ranges(use.stats, ck.settings)
    for i, why in dead:
        node = use.conds[i][1]
        ck.sink.warning(
            "W030",
            f"this gate branch is never taken: {why}",
            node.pos,  # type: ignore[union-attr]
            hint=ranges or "remove the branch or change its condition",
        )
    for cond, node in use.conds:
        check_off_grid(ck, cond, node.pos)  # type: ignore[union-attr]
    if else_dead and not dead:
        ck.sink.warning(
            "W030",
            "the else branch is never taken: the conditions above cover every case",
            use.orelse.pos,
            hint=ranges or "remove a condition",
        )  # type: ignore[union-attr]


def check_off_grid(ck: Checker, cond: Cond, pos: object, sink: Sink | None = None) -> None:
    """W033 for each comparison of ``acc`` with a constant between two of its values k/n,
    into ``sink`` (the recipe's by default)."""
    sink = sink or ck.sink
    if ck.settings is None:
        return
    n = ck.settings.rollout.n
    for cmp, point in reach.off_grid(cond, n):
        grid = Const(point)
        same = Compare(cmp.op, cmp.left, grid) if isinstance(cmp.right, Const) else Compare(cmp.op, grid, cmp.right)
        sink.warning(
            "W033",
            f"with rollout.n = {n}, acc is a multiple of 1/{n}: `{show_cond(cmp)}` selects the same "
            f"questions as `{show_cond(same)}`",
            pos,
            hint="sample n rollouts for which the threshold is a multiple of 1/n (the HPT paper's "
            f"γ = 1/8 and 2/8 are for rollout.n = 8), or write {num(point)}",
        )


def _ranges(stats: set[str], st: Settings) -> str:
    n, steps = st.rollout.n, st.train.steps
    known = {
        "acc": f"acc is in {{0, 1/{n}, ..., 1}} (n = {n})" if n > 1 else "acc is 0 or 1 (n = 1)",
        "solved": f"solved is 0..{n}",
        "reward_mean": "reward_mean is in [0, 1]",
        "reward_std": "reward_std is in [0, 1]",
        "n": f"n is {n}",
        "step": f"step is 0..{steps - 1} (train.steps = {steps})",
    }
    return "; ".join(known[s] for s in sorted(stats) if s in known)


def uses_rows(s: EstimatorSpec, rows: str) -> bool:
    """Whether the estimator reads ``rows`` ('rollouts' or 'demos'): as the rows it
    trains on, or as members of the groups its advantage is computed over."""
    pooled = s.adv.name in GROUP_ADVANTAGES and rows in s.group
    return rows in s.on or pooled


def check_gates_need_rollouts(ck: Checker, loss: LossExpr) -> None:
    if any(uses_rows(t.estimator, "rollouts") for t in terms(loss)):
        return
    for use in ck.gates:
        if use.stat_pos is not None:
            stat = sorted(s for s in use.stats if s != "step")[0]
            ck.sink.error(
                "E023",
                f"gate on '{stat}', but no estimator in this recipe learns from rollouts, "
                "so there are none to measure it on",
                use.stat_pos,
                hint="add an estimator on rollouts (e.g. grpo), or gate on `step`",
            )


def check_recipe(ck: Checker, needs: Needs, settings_pos: dict[tuple[str, str], object]) -> None:
    check_sampling(ck, needs, settings_pos)
    check_engine(ck, settings_pos)
    st = ck.settings
    if st is None or not needs.old_logprobs or st.rollout.old_logprobs != "engine":
        return
    if st.rollout.top_p < 1 or st.rollout.top_k > 0:
        pos = settings_pos.get(("rollout", "old_logprobs"))
        ck.sink.warning(
            "W032",
            "π_old comes from the engine's log-probs while sampling with top_p < 1 or top_k > 0: "
            "the engine renormalises over the kept tokens, so its log-probs are not π_old",
            pos,
            hint="set rollout.old_logprobs = learner, or sample with top_p = 1 and top_k = 0",
        )


def check_sampling(ck: Checker, needs: Needs, settings_pos: dict[tuple[str, str], object]) -> None:
    """The DAPO settings of ``rollout`` (hpt_dsl.sampling) against the run they are in."""
    if ck.settings is None:
        return
    r = ck.settings.rollout
    if not needs.rollouts:
        for key, on in (("dynamic_sampling", r.dynamic_sampling), ("overlong_cache", r.overlong_cache > 0),
                        ("mask_truncated", r.mask_truncated)):  # fmt: skip
            if on:
                ck.sink.warning(
                    "W032",
                    f"rollout.{key} has no effect: no estimator of this recipe learns from rollouts",
                    settings_pos.get(("rollout", key)),
                    hint=f"remove rollout.{key}, or add an estimator on rollouts (e.g. dapo)",
                )
        return
    if r.dynamic_sampling and r.n < 2:
        ck.sink.error(
            "E045",
            "rollout.dynamic_sampling with rollout.n = 1: the rewards of a one-rollout group always agree, "
            "so every question would be dropped",
            settings_pos.get(("rollout", "dynamic_sampling")) or settings_pos.get(("rollout", "n")),
            hint="sample several rollouts per question (rollout.n = 8; DAPO samples 16)",
        )
    if r.overlong_cache > r.max_new_tokens:
        ck.sink.error(
            "E045",
            f"rollout.overlong_cache = {r.overlong_cache} is longer than the budget rollout.max_new_tokens = "
            f"{r.max_new_tokens}: the length penalty would cover more than the whole response",
            settings_pos.get(("rollout", "overlong_cache")) or settings_pos.get(("rollout", "max_new_tokens")),
            hint="set rollout.overlong_cache to at most rollout.max_new_tokens (DAPO: 4096 of 20480)",
        )


def check_engine(ck: Checker, settings_pos: dict[tuple[str, str], object]) -> None:
    """A remote rollout server needs its address (``hpt_dsl.rollout.server``)."""
    if ck.settings is None or ck.settings.rollout.engine != "vllm_server":
        return
    address = ck.settings.rollout.server
    if not address:
        ck.sink.error(
            "E046",
            "rollout.engine = vllm_server needs the server's address, and rollout.server is not set",
            settings_pos.get(("rollout", "engine")),
            hint='set rollout.server = "host:port" (the vLLM server started as docs/vllm.md shows)',
        )
        return
    from hpt_dsl.rollout.protocol import valid_address

    if not valid_address(address):
        ck.sink.error(
            "E046",
            f"rollout.server = {address!r} is not a server address",
            settings_pos.get(("rollout", "server")),
            hint='write it as "host:port", e.g. "10.0.0.5:8000", or as a URL "http://host:port"',
        )


# ----- what a run needs ------------------------------------------------------------------------


def needs(loss: LossExpr, plugins: tuple[Plugin, ...] = ()) -> Needs:
    """What a run of this loss needs: which rows, which extra forward passes and models."""
    declared = {(d.kind, d.name): tuple(d.props.get("needs", ())) for p in plugins for d in p.components}
    rollouts = demos = False
    extra: set[str] = set()
    for t in terms(loss):
        s = t.estimator
        rollouts |= uses_rows(s, "rollouts")
        demos |= uses_rows(s, "demos")
        extra |= estimator_needs(s, declared)
    rollouts |= bool(stats_used(loss) - {"step"})
    return Needs(
        rollouts=rollouts, demos=demos, old_logprobs="old_logprobs" in extra, ref_model="ref_model" in extra,
        critic="critic" in extra, entropy="entropy" in extra,
    )  # fmt: skip
