"""GRPO throughput on a CPU: hpt-dsl's ``recipes/grpo.hpt`` against TRL's ``GRPOTrainer``.

    pip install -c constraints.txt -e ".[bench]"      # TRL, pinned
    python bench/vs_trl.py                            # 2 rounds x 30 steps per side, rotating
    python bench/vs_trl.py --steps 12 --rounds 3 --threads 2
    python bench/vs_trl.py --task gsm8k --steps 6 --sides hpt-dsl TRL   # SmolLM2-135M

The same work on both sides:

* the same model: the built-in tiny model after a short hpt-dsl SFT run (``recipes/sft.hpt``,
  120 steps: about a third of the test questions right; a randomly initialised model never
  earns a reward, so GRPO would have nothing to learn from), saved with ``save_pretrained``
  and loaded from that folder by both frameworks, with its tokenizer and chat template;
* the same prompts (the built-in arithmetic task's train split, chat-templated; the script
  checks that both frameworks build identical prompt token ids), the same reward function
  (``hpt_dsl.data.arith.reward``: last ``\\boxed{}`` equals the answer);
* the same GRPO: group size n, questions per step, completion length, temperature 1,
  learning rate (constant), AdamW betas, gradient clipping, clip epsilon 0.2, group-normalised
  advantages, no KL term, one update epoch, sequence-mean-token-mean aggregation (TRL's
  ``loss_type="grpo"``), the same micro-batch (TRL: per-device batch + accumulation);
* TRL with ``use_cpu=True``, ``use_vllm=False``, no gradient checkpointing, fp32, no hub access.

Every framework runs each round in a fresh Python process of its own (as its users run it:
no allocator state, thread setting or imported module leaks from one framework into the
other), and rounds rotate the order so that a load that drifts over time (a shared machine)
hits all alike. hpt-dsl raises glibc's malloc thresholds itself (``hpt_dsl.malloc``); TRL
runs twice, as shipped and as a third side, "TRL + malloc", with the same thresholds set
through the environment, so that the ratio against each is on record. A step's time is from its start (sampling)
to the end of its optimizer step (and, for hpt-dsl, the weight sync to its rollout
engine); model loading and evaluation are excluded on both sides. Both wall seconds and
process CPU seconds are recorded per step: with one thread (``--threads 1``, the default,
the fastest setting for this model on a small CPU) CPU seconds are the work a step costs,
little disturbed by other programs on the machine.

Prints a table and writes ``bench/results/vs_trl.json``: steps/s, generated tokens/s, their
ratio hpt-dsl / TRL (wall, and per CPU second), the learning check (held-out accuracy,
avg@4 on 200 test questions sampled identically for every model, of the start model and of
each framework's trained models: both must improve on the start), the training reward of
the first and last third of the steps (a framework learned when its reward rose), and
each framework's seconds per step split into rollout, reward, log-prob passes (TRL: the rest
of building the batch) and update.

``--task gsm8k`` runs the same comparison where the model's arithmetic dominates:
SmolLM2-135M-Instruct (the ``smollm2-135m`` checkpoint that hpt-dsl ships) on GSM8K train
questions with the system prompt of ``recipes/smollm2_hpt.hpt`` and the math-verify reward
(hpt-dsl's scorer on both sides), 4 questions x 4 rollouts of up to 128 tokens, learning
rate 1e-5, micro-batches of 8 rows, 2 threads, no learning check (a few steps of a 135M
model on GSM8K move no held-out figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Side:
    """One framework's measured steps over all rounds."""

    name: str
    step_s: list[float] = field(default_factory=list)  # wall seconds per step
    cpu_s: list[float] = field(default_factory=list)  # process CPU seconds per step
    gen_tokens: list[int] = field(default_factory=list)
    reward: list[list[float]] = field(default_factory=list)  # per round, per step
    split: dict[str, float] = field(default_factory=dict)  # seconds summed over steps
    held_out: list[float] = field(default_factory=list)  # per round: avg@k of the trained model

    @property
    def steps_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s)

    @property
    def steps_per_cpu_s(self) -> float:
        return len(self.cpu_s) / sum(self.cpu_s)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.gen_tokens) / sum(self.step_s)

    def reward_thirds(self) -> tuple[float, float]:
        """Mean training reward of the first and of the last third of the steps (all rounds)."""
        k = max(1, min(len(r) for r in self.reward) // 3)
        first = statistics.fmean(x for r in self.reward for x in r[:k])
        last = statistics.fmean(x for r in self.reward for x in r[-k:])
        return first, last


# ----- the shared setup ----------------------------------------------------------------------

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TASKS: dict[str, dict[str, Any]] = {
    # the built-in arithmetic task on the tiny model: per-step overhead dominates
    "arith": {"steps": 30, "questions": 16, "n": 8, "max_new_tokens": 48, "lr": 2e-4, "micro_batch": 64,
              "threads": 1, "eval_questions": 200, "overrides": []},
    # SmolLM2-135M-Instruct on GSM8K (recipes/smollm2_hpt.hpt's data, model and sizes):
    # forward and backward passes dominate
    "gsm8k": {"steps": 4, "questions": 4, "n": 4, "max_new_tokens": 128, "lr": 1e-5, "micro_batch": 8,
              "threads": 2, "eval_questions": 0,
              "overrides": [f"model.system_prompt={SYSTEM}", "data.train=data/train/gsm8k_train.jsonl",
                            "data.test=data/eval/gsm8k.jsonl", "data.reward=math_verify"]},
}  # fmt: skip
"""Per task: the defaults of the size options and the recipe overrides that select it."""


def task_overrides(task: str) -> list[str]:
    """``TASKS[task]["overrides"]`` with the data files as absolute paths."""
    out = []
    for item in TASKS[task]["overrides"]:
        key, value = item.split("=", 1)
        out.append(f"{key}={ROOT / value}" if value.startswith("data/") else item)
    return out


def task_settings(task: str, seed: int) -> Any:
    """hpt-dsl's Settings of ``task`` (model prompt, data files, reward) with ``train.seed``:
    ``recipes/grpo.hpt``'s, with the task's overrides applied as ``--set`` does."""
    from hpt_dsl import load_recipe

    return load_recipe(ROOT / "recipes" / "grpo.hpt", overrides=[*task_overrides(task), f"train.seed={seed}"]).settings


def task_model(args: argparse.Namespace) -> Path:
    """The model folder both frameworks load: the SFT-warmed tiny model, or SmolLM2-135M."""
    if args.task == "arith":
        return start_model(args.work, args.warm_steps, args.threads)
    from hpt_dsl.hub import resolve

    return Path(resolve("smollm2-135m"))


def messages(system: str | None, question: str) -> list[dict[str, str]]:
    """The conversational prompt TRL gets: hpt-dsl's ``encode_prompt`` builds the same one."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}]


def start_model(work: Path, warm_steps: int, threads: int) -> Path:
    """The tiny model after ``warm_steps`` of hpt-dsl SFT; built once per work folder."""
    from hpt_dsl.train import run_recipe

    run = work / "warm-start"
    final = run / "final-model"
    if (final / "config.json").exists():
        return final
    if run.exists():
        import shutil

        shutil.rmtree(run)
    print(f"teaching the answer format: {warm_steps} SFT steps (recipes/sft.hpt) ...", flush=True)
    run_recipe(
        ROOT / "recipes" / "sft.hpt",
        overrides=[
            f"train.steps={warm_steps}",
            "train.eval_every=0",
            "train.save_every=0",
            "data.max_test=64",
            "train.lr=3e-3",
            "train.questions=32",
        ],
        output=run,
        quiet=True,
    )
    return final


def grpo_overrides(args: argparse.Namespace, model: Path, seed: int) -> list[str]:
    return task_overrides(args.task) + [
        f"model.name={model}",
        f"train.steps={args.steps}",
        f"train.questions={args.questions}",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"train.lr={args.lr}",
        "train.schedule=constant",
        "train.mini_batches=1",
        "train.warmup_steps=0",
        f"train.micro_batch={args.micro_batch}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        f"train.seed={seed}",
        "train.eval_every=0",
        "train.save_every=0",
        "data.max_test=1",
    ]


def check_same_prompts(model: Path, task: Any) -> None:
    """hpt-dsl's prompt ids == the ids TRL builds from a conversational prompt."""
    from transformers import AutoTokenizer

    from hpt_dsl.data import load_task
    from hpt_dsl.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(model)
    for q in load_task(task).train[:32]:
        ours = encode_prompt(tok, q.prompt, task.model)
        theirs = tok.apply_chat_template(
            [messages(task.model.system_prompt, q.prompt)],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"][0]
        if list(theirs) != ours:
            raise SystemExit(f"prompt ids differ for {q.prompt!r}: {ours} vs {list(theirs)}")


def held_out(model: Path, args: argparse.Namespace) -> float:
    """avg@k of a model folder on the first ``--eval-questions`` test questions of the task,
    sampled the same way for every model (hpt-dsl's evaluation: temperature 0.6, top-p 0.95,
    ``--eval-k`` samples per question, fixed seed): the learning check of both frameworks."""
    import torch

    from hpt_dsl.data import load_task
    from hpt_dsl.evaluate import evaluate
    from hpt_dsl.models import load_local
    from hpt_dsl.prompting import PromptCache
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.hf import HFRolloutEngine

    if not args.eval_questions:
        return float("nan")
    s = task_settings(args.task, 0)
    task = load_task(s)
    policy, tok = load_local(model, s.model)
    questions = task.test[: args.eval_questions]
    prompts = PromptCache(tok, s.model)
    params = SamplingParams(
        temperature=s.eval.temperature, top_p=s.eval.top_p, max_new_tokens=args.max_new_tokens, seed=1234
    )
    with torch.random.fork_rng(devices=[]):
        out = evaluate(
            HFRolloutEngine(policy, tok, s),
            tok,
            questions,
            task.reward_fn,
            args.eval_k,
            params,
            encode=lambda q: prompts.prompt(q, "test"),
            batch_questions=64,
        )
    return float(out[f"avg@{args.eval_k}"])


# ----- hpt-dsl ----------------------------------------------------------------------------------


def run_hpt(args: argparse.Namespace, model: Path, seed: int, work: Path, side: Side) -> None:
    from hpt_dsl import train as loop
    from hpt_dsl.runs import read_jsonl

    out = work / f"hpt-seed{seed}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    step = loop.Trainer.train_step

    def timed(self: Any, i: int) -> dict[str, Any]:
        c0 = time.process_time()
        row = step(self, i)
        side.cpu_s.append(time.process_time() - c0)
        return row

    loop.Trainer.train_step = timed  # type: ignore[method-assign]
    try:
        loop.run_recipe(
            ROOT / "recipes" / "grpo.hpt", overrides=grpo_overrides(args, model, seed), output=out, quiet=True
        )
    finally:
        loop.Trainer.train_step = step  # type: ignore[method-assign]
    side.held_out.append(held_out(out / "final-model", args))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    side.step_s += [r["time/step"] for r in rows]
    side.gen_tokens += [round(r["response_length"] * args.questions * args.n) for r in rows]
    side.reward.append([r["reward/mean"] for r in rows])
    for key in ("time/rollout", "time/reward", "time/logprob", "time/update"):
        side.split[key[5:]] = side.split.get(key[5:], 0.0) + sum(r[key] for r in rows)


# ----- TRL ----------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, model: Path, seed: int, work: Path, side: Side) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpt_dsl.data import load_task
    from hpt_dsl.data.verify import score_batch

    settings = task_settings(args.task, seed)
    task = load_task(settings)
    system = settings.model.system_prompt
    data = Dataset.from_list([{"prompt": messages(system, q.prompt), "answer": q.answer} for q in task.train])
    step_rewards: list[float] = []
    step_tokens: list[int] = []

    def reward(
        prompts: list[Any],
        completions: list[Any],
        answer: list[str],
        completion_ids: list[list[int]],
        **_: Any,
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = score_batch(task.reward_fn, texts, answer)  # hpt-dsl's scorer, the same function
        step_rewards.extend(scores)
        step_tokens.append(sum(len(c) for c in completion_ids))
        return scores

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            side.step_s.append(time.perf_counter() - self.t0)
            side.cpu_s.append(time.process_time() - self.c0)

    batch = args.questions * args.n
    micro = min(args.micro_batch, batch)
    config = GRPOConfig(
        output_dir=str(work / f"trl-seed{seed}"),
        use_cpu=True,
        use_vllm=False,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_generations=args.n,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=args.steps,
        seed=seed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Timer()],
    )
    spent = dict.fromkeys(("rollout", "reward", "score"), 0.0)

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    # where TRL's time goes: sampling, scoring, the rest of building the batch (tokenising,
    # log-prob passes, advantages), and the update (the step's remainder)
    trainer._generate_single_turn = timed("rollout", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("score", trainer._generate_and_score_completions)
    trainer.train()
    side.split = {
        "rollout": spent["rollout"],
        "reward": spent["reward"],
        "logprob": spent["score"] - spent["rollout"] - spent["reward"],
        "update": sum(side.step_s) - spent["score"],
    }
    final = work / f"trl-seed{seed}" / "final-model"
    trainer.model.save_pretrained(final)
    trainer.processing_class.save_pretrained(final)
    side.held_out.append(held_out(final, args))
    per_step = len(step_rewards) // args.steps
    side.reward.append(
        [statistics.fmean(step_rewards[i * per_step : (i + 1) * per_step]) for i in range(args.steps)]
    )
    # the reward function sees one accumulation slice per call: sum the slices of each step
    calls = len(step_tokens) // args.steps
    side.gen_tokens += [sum(step_tokens[i * calls : (i + 1) * calls]) for i in range(args.steps)]


# ----- one side's round, in a process of its own -----------------------------------------------

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
"""The thresholds hpt-dsl sets for itself (``hpt_dsl.malloc``), for the "TRL + malloc" side."""

SIDES = {"hpt-dsl": ("hpt", {}), "TRL": ("trl", {}), "TRL + malloc": ("trl", MALLOC_ENV)}
WORKER_ARGS = ("task", "steps", "questions", "n", "max_new_tokens", "lr", "micro_batch", "threads", "eval_questions",
               "eval_k", "work")  # fmt: skip
"""The settings a side's process is started with."""


def run_round(args: argparse.Namespace, side: str, seed: int, model: Path) -> dict[str, Any]:
    """One round of ``side`` in a new Python process; its measured Side as a dict."""
    import subprocess
    import sys

    kind, extra = SIDES[side]
    out = args.work / f"{kind}-{seed}-{len(extra)}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--seed", str(seed), "--model", str(model),
           "--side-out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                      if k in WORKER_ARGS]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    subprocess.run(cmd, env={**env, **extra}, check=True)
    return json.loads(out.read_text())


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    side = Side(args.worker)
    fn = run_hpt if args.worker == "hpt" else run_trl
    fn(args, args.model, args.seed, args.work, side)
    args.side_out.write_text(json.dumps(asdict(side)))


def merge(side: Side, part: dict[str, Any]) -> None:
    """Add one round's measurements to ``side``."""
    side.step_s += part["step_s"]
    side.cpu_s += part["cpu_s"]
    side.gen_tokens += part["gen_tokens"]
    side.reward += part["reward"]
    side.held_out += part["held_out"]
    for k, v in part["split"].items():
        side.split[k] = side.split.get(k, 0.0) + v


# ----- main -----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="arith", help="tiny model on arithmetic, or SmolLM2 on GSM8K")
    p.add_argument("--steps", type=int, help="GRPO steps per round and framework (arith 30, gsm8k 4)")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds; each runs every side once, order rotating"
    )
    p.add_argument("--questions", type=int, help="questions per step (16, 4)")
    p.add_argument("--n", type=int, help="rollouts per question, the group size (8, 4)")
    p.add_argument("--max-new-tokens", type=int, help="(48, 128)")
    p.add_argument("--lr", type=float, help="(2e-4, 1e-5)")
    p.add_argument("--micro-batch", type=int, help="(64, 8)")
    p.add_argument("--warm-steps", type=int, default=120, help="SFT steps that build the start model")
    p.add_argument("--threads", type=int, help="torch threads for both, 0 = torch's default (1, 2)")
    p.add_argument("--eval-questions", type=int, help="test questions of the learning check (200, 0 = none)")
    p.add_argument("--eval-k", type=int, default=4, help="samples per test question of the learning check")
    p.add_argument("--work", type=Path, default=RESULTS / "vs_trl-work")
    p.add_argument("--out", type=Path, default=RESULTS / "vs_trl.json")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), help="what to run")
    p.add_argument("--worker", choices=["hpt", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in TASKS[args.task].items():
        if getattr(args, key, 0) is None:
            setattr(args, key, value)
    if args.worker:
        worker(args)
        return

    import torch
    import transformers

    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -c constraints.txt -e '.[bench]'") from None

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model = task_model(args)
    check_same_prompts(model, task_settings(args.task, 0))
    before = held_out(model, args)
    if args.eval_questions:
        print(f"start model: held-out avg@{args.eval_k} {before:.3f}", flush=True)
    names = {"hpt-dsl": "hpt-dsl", "TRL": f"TRL {trl.__version__}", "TRL + malloc": f"TRL {trl.__version__} + malloc"}
    sides = {k: Side(names[k]) for k in args.sides}
    for r in range(args.rounds):
        order = list(sides)[r % len(sides) :] + list(sides)[: r % len(sides)]
        for key in order:
            print(f"round {r + 1}/{args.rounds}: {sides[key].name} ({args.steps} steps) ...", flush=True)
            merge(sides[key], run_round(args, key, r, model))

    rows = []
    for side in sides.values():
        first, last = side.reward_thirds()
        after = statistics.fmean(side.held_out)
        rows.append(
            {
                "framework": side.name,
                "steps": len(side.step_s),
                "steps_per_s": side.steps_per_s,
                "gen_tokens_per_s": side.tokens_per_s,
                "median_step_s": statistics.median(side.step_s),
                "steps_per_cpu_s": side.steps_per_cpu_s,
                "reward_first_third": first,
                "reward_last_third": last,
                "held_out_before": before,
                "held_out_after": after,
                "held_out_up": after > before,
                "learned": last > first,
            }
        )
    result: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "seed", "model", "side_out", "work", "out")},  # fmt: skip
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
            "threads": args.threads or torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
        "results": rows,
    }
    hpt = sides.get("hpt-dsl")
    for key, suffix in (("TRL", ""), ("TRL + malloc", "_malloc")):
        ref = sides.get(key)
        if hpt is None or ref is None:
            continue
        result[f"ratio_steps_per_s{suffix}"] = hpt.steps_per_s / ref.steps_per_s
        result[f"ratio_tokens_per_s{suffix}"] = hpt.tokens_per_s / ref.tokens_per_s
        result[f"ratio_steps_per_cpu_s{suffix}"] = hpt.steps_per_cpu_s / ref.steps_per_cpu_s
    result["time_split_s"] = {side.name: side.split for side in sides.values()}
    result["raw"] = {side.name: asdict(side) for side in sides.values()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    print()
    print(
        f"{'framework':<22} {'steps':>5} {'steps/s':>8} {'steps/cpu-s':>11} {'gen tok/s':>9} "
        f"{'train reward 1st->3rd third':>28} {'held-out before->after':>23}"
    )
    for row in rows:
        reward = f"{row['reward_first_third']:.3f} -> {row['reward_last_third']:.3f}"
        held = f"{row['held_out_before']:.3f} -> {row['held_out_after']:.3f}"
        print(
            f"{row['framework']:<22} {row['steps']:>5} {row['steps_per_s']:>8.3f} {row['steps_per_cpu_s']:>11.3f} "
            f"{row['gen_tokens_per_s']:>9.0f} {reward:>28} {held:>23}"
        )
    for key, suffix in (("TRL", ""), ("TRL + malloc", "_malloc")):
        if f"ratio_steps_per_s{suffix}" in result:
            print(
                f"hpt-dsl / {key}: steps/s x{result[f'ratio_steps_per_s{suffix}']:.2f}, generated tokens/s "
                f"x{result[f'ratio_tokens_per_s{suffix}']:.2f}, steps per CPU second "
                f"x{result[f'ratio_steps_per_cpu_s{suffix}']:.2f}"
            )
    for side in sides.values():
        steps = len(side.step_s)
        print(f"{side.name} seconds per step: " + ", ".join(f"{k} {v / steps:.2f}" for k, v in side.split.items()))
    print(f"all learned (training reward up from the first to the last third): {all(r['learned'] for r in rows)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
