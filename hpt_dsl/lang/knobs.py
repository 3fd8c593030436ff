"""W032 for settings the run would ignore: a setting given in the recipe or with ``--set``
that has no effect for the recipe and data it is given is a warning at the place it was set.

Each rule names the settings it covers, the condition under which the run ignores them, and
why. ``tests/test_knobs.py`` goes through every setting: for each it shows a run it changes
and, for each rule here, that a run under the rule's condition is the same with and without
the setting. Rules about the estimator's own components are in ``rules.py``.

    RULES                                        the table below
    check(settings, needs, module, entries, sink)  the warnings, into each entry's sink
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hpt_dsl.lang import ast
from hpt_dsl.lang.diagnostics import Sink
from hpt_dsl.lang.settings_map import Entry
from hpt_dsl.recipe import Needs
from hpt_dsl.settings import Settings

BUILTIN = "arith"


def builtin(s: Settings) -> bool:
    """The built-in task: questions, answers and reward of its own."""
    return s.data.train == BUILTIN


def held_out(s: Settings) -> bool:
    """Whether the run has a held-out set to evaluate on: the built-in task's test split, or
    ``data.test``."""
    return builtin(s) or s.data.test is not None


def reward_workers(s: Settings) -> int:
    """The reward's worker processes (``hpt_dsl.data.verify.make_reward``): none for 'boxed';
    ``data.reward_workers``, else up to 4 for math_verify and none for the rest."""
    if s.data.reward == "boxed":
        return 0
    if s.data.reward_workers is not None:
        return s.data.reward_workers
    return 1 if s.data.reward == "math_verify" else 0


@dataclass(frozen=True)
class Rule:
    """``keys`` have no effect when ``when(settings, needs)``; ``why`` says why, ``hint`` what to do."""

    keys: tuple[str, ...]
    when: Callable[[Settings, Needs], bool]
    why: str
    hint: str


RULES: tuple[Rule, ...] = (
    Rule(
        ("data.reward", "data.reward_timeout", "data.reward_workers", "eval.reward"),
        lambda s, n: builtin(s),
        "the built-in task 'arith' scores every answer with its own exact-integer check",
        "give data.train a JSONL / Parquet file or a dataset to score with this reward, or remove the setting",
    ),
    Rule(
        ("data.question_key", "data.answer_key", "data.demo_key"),
        lambda s, n: builtin(s) and s.data.test in (None, BUILTIN),
        "the built-in task has no columns to pick",
        "remove it, or give data.train (or data.test) a file with those columns",
    ),
    Rule(
        ("data.demo_key",),
        lambda s, n: not n.demos,
        "no estimator of this recipe learns from demonstrations",
        "remove it, or add an estimator on demos (e.g. sft)",
    ),
    Rule(
        ("data.max_test", "train.eval_every", "train.eval_n", "eval.temperature", "eval.top_p", "eval.max_new_tokens",
         "eval.reward"),
        lambda s, n: not held_out(s),
        "the run has no held-out set to evaluate (data.test is not set)",
        "set data.test to a file of held-out questions, or remove the setting",
    ),
    Rule(
        ("data.reward_timeout",),
        lambda s, n: not builtin(s) and reward_workers(s) == 0 and s.data.reward != "math_verify",
        "the reward runs in this process, where no timeout applies (only worker processes and math_verify "
        "have one)",
        "set data.reward_workers = 2 (or more) to score in worker processes with this timeout",
    ),
    Rule(
        ("data.reward_workers",),
        lambda s, n: not builtin(s) and s.data.reward == "boxed",
        "the 'boxed' reward is a regex and a string compare, always scored in this process",
        "remove it",
    ),
    Rule(
        ("rollout.n", "rollout.top_p", "rollout.top_k", "rollout.tis_cap", "rollout.old_logprobs"),
        lambda s, n: not n.rollouts,
        "this recipe samples no rollouts (it learns from demonstrations only)",
        "remove it, or add an estimator on rollouts (e.g. grpo); the evaluation samples with eval { } "
        "(rollout.temperature still sets the temperature of the learner's log-probs)",
    ),
    Rule(
        ("rollout.max_new_tokens",),
        lambda s, n: not n.rollouts and (s.eval.max_new_tokens is not None or not held_out(s)),
        "this recipe samples no rollouts and the evaluation has its own eval.max_new_tokens (or no held-out set)",
        "remove it",
    ),
    Rule(
        ("rollout.old_logprobs",),
        lambda s, n: n.rollouts and not n.old_logprobs,
        "no estimator of this recipe uses π_old (denom=pi_old / pi_old_seq or mask=cispo)",
        "remove it; rollout.tis_cap corrects the engine/learner mismatch without π_old",
    ),
    Rule(
        ("rollout.max_sampling_rounds",),
        lambda s, n: not s.rollout.dynamic_sampling,
        "it bounds DAPO's dynamic sampling, and rollout.dynamic_sampling is off",
        "set rollout.dynamic_sampling = true, or remove it",
    ),
    Rule(
        ("rollout.overlong_penalty",),
        lambda s, n: s.rollout.overlong_cache == 0,
        "rollout.overlong_cache = 0 turns the overlong length penalty off",
        "set rollout.overlong_cache (e.g. a quarter of rollout.max_new_tokens), or remove it",
    ),
    Rule(
        ("rollout.gpu_memory_utilization", "rollout.sleep_between_steps", "rollout.max_model_len",
         "rollout.tensor_parallel_size"),
        lambda s, n: s.rollout.engine != "vllm",
        "it configures the in-process vLLM engine, and this run samples with another rollout.engine",
        "set rollout.engine = vllm, or remove it (a vLLM server takes these as its own flags)",
    ),
    Rule(
        ("rollout.server", "rollout.server_dir", "rollout.server_timeout"),
        lambda s, n: s.rollout.engine != "vllm_server",
        "it configures the remote vLLM server, and this run samples with another rollout.engine",
        "set rollout.engine = vllm_server, or remove it",
    ),
    Rule(
        ("learner.zero_stage", "learner.offload", "learner.deepspeed_config"),
        lambda s, n: s.learner.engine != "deepspeed",
        "it configures DeepSpeed, and this run's learner is learner.engine = torch",
        "set learner.engine = deepspeed, or remove it",
    ),
    Rule(
        ("learner.share_prompts",),
        lambda s, n: s.learner.engine == "deepspeed" and s.learner.zero_stage == 3,
        "under ZeRO-3 every forward pass gathers the parameters, so each micro-batch runs one plain forward",
        "remove it",
    ),
    Rule(
        ("learner.share_prompts",),
        lambda s, n: s.learner.gradient_checkpointing,
        "a checkpointed layer keeps no KV cache to share, so learner.gradient_checkpointing = true runs each "
        "micro-batch as one plain forward",
        "remove it, or set learner.gradient_checkpointing = false",
    ),
    Rule(
        ("learner.logprob_chunk",),
        lambda s, n: not s.learner.fused_logprob,
        "it sizes the chunks of the fused log-prob path, and learner.fused_logprob is off",
        "set learner.fused_logprob = true, or remove it",
    ),
    Rule(
        ("critic.lr", "critic.value_clip", "critic.coef"),
        lambda s, n: not n.critic,
        "no estimator of this recipe uses a critic (adv=gae)",
        "remove the critic block, or use adv=gae (e.g. ppo)",
    ),
    Rule(
        ("train.warmup_steps",),
        lambda s, n: s.train.schedule == "constant",
        "train.schedule = constant has no warm-up",
        "set train.schedule = warmup or cosine, or remove it",
    ),
    Rule(
        ("log.project",),
        lambda s, n: not {"wandb", "mlflow"} & set(s.log.to),
        "it names the W&B project and the MLflow experiment, and log.to names neither",
        "add wandb or mlflow to log.to (e.g. --set log.to=wandb), or remove it",
    ),
    Rule(
        ("model.system_prompt",),
        lambda s, n: s.model.prompt_template is not None,
        "model.prompt_template replaces the chat template, and the system message with it",
        "put the system text into model.prompt_template, or remove one of the two",
    ),
)
"""Every setting the run ignores, and when. A setting listed in no rule has an effect in every run."""


def check(settings: Settings, needs: Needs, module: ast.Module, entries: Sequence[Entry], sink: Sink) -> None:
    """W032 at each setting of ``entries`` (recipe, then ``--set``: the later wins) that a rule
    says has no effect (once per setting, the first rule that applies), and at a bare
    ``critic { }`` block of the recipe (``sink``) that no estimator uses."""
    given = {f"{e.section}.{e.key}": e for e in entries}
    warned: set[str] = set()
    for rule in RULES:
        if not rule.when(settings, needs):
            continue
        for key in rule.keys:
            e = given.get(key)
            if e is not None and key not in warned:
                warned.add(key)
                e.sink.warning("W032", f"{key} has no effect: {rule.why}", e.key_pos, hint=rule.hint)
    if settings.critic is not None and not needs.critic and not any(k.startswith("critic.") for k in given):
        block = next((s for s in module.stmts if isinstance(s, ast.Block) and s.section == "critic"), None)
        if block is not None:
            sink.warning("W032", "the critic block has no effect: no estimator of this recipe uses a critic "
                         "(adv=gae)", block.section_pos, hint="remove it, or use adv=gae (e.g. ppo)")
