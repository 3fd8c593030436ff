"""No silent knobs: every setting either changes the run, or is warned about (W032) where it cannot.

``EFFECT`` names, for every setting of every section, a run (recipe and settings) and a value
of the setting that changes it: its metrics, its final weights and config, or the files it
writes; the few settings that only act outside a tiny CPU run (vLLM, DeepSpeed's config, CPU
threads, the run folder) are shown at the code that consumes them. ``IGNORED`` names, for each
rule of ``hpt_dsl.lang.knobs`` (and the rollout rules of ``rules.py``), a run in which the
setting has no effect: the checker warns at the setting, and the run is the same with it and
without it. A new setting without an entry here fails ``test_every_setting_has_a_case``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hpt_dsl.lang import knobs, load_recipe
from hpt_dsl.settings import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
BASE = ("train.questions=2", "rollout.n=2", "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "data.max_test=2",
        "train.micro_batch=4", "train.steps=2", "train.eval_every=1", "train.save_every=1", "train.lr=0.01")
REWARDS = '''
import os
import time


def one(response, answer):
    return 1.0


def value(response, answer):
    return float(answer) / 100


def slow(response, answer):
    time.sleep(0.2)
    return 1.0


def parity(response, answer):
    """0 or 1 by the response's characters: rewards that differ between samples."""
    return float(sum(map(ord, response)) % 2)


def where(response, answer):
    """1.0 in a worker process, 0.0 in the run's own."""
    return float(os.getpid() != int(os.environ["KNOBS_MAIN_PID"]))
'''


@dataclass(frozen=True)
class Case:
    """A run of ``recipe`` with ``BASE + base``, and ``alt`` (``key=value``) added."""

    alt: str
    base: tuple[str, ...] = ()
    recipe: str = "hpt.hpt"
    run: bool = True  # False: the run needs what this machine lacks; the warning alone is checked


@dataclass(frozen=True)
class Probe:
    """A setting shown at the code that consumes it: ``check(folder)`` asserts the effect."""

    check: Callable[[Path], None]
    why: str = field(default="")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data files with two sets of columns, a reward module, a second tiny model."""
    from hpt_dsl.models import build_tiny

    folder = tmp_path_factory.mktemp("knobs")
    rows = []
    for i in range(12):
        a, b = i + 2, 3 * i + 1
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b),
                     "solution": f"{a} + {b} = \\boxed{{{a + b}}}", "q2": f"Compute {a} times {b}.",
                     "a2": str(a * b), "s2": f"{a} * {b} = \\boxed{{{a * b}}}"})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (folder / "one.jsonl").write_text(json.dumps(rows[5]) + "\n")
    (folder / "knob_rewards.py").write_text(REWARDS)
    (folder / "ds.json").write_text(json.dumps({"wall_clock_breakdown": True}))
    build_tiny(folder / "other-tiny", seed=1)
    return folder


@pytest.fixture(scope="module", autouse=True)
def reward_module(files: Path) -> Any:
    """The reward module importable here and in reward worker processes."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(files))
    mp.setenv("PYTHONPATH", os.pathsep.join([str(files), os.environ.get("PYTHONPATH", "")]))
    mp.setenv("KNOBS_MAIN_PID", str(os.getpid()))
    yield
    mp.undo()


def q(path: Path) -> str:
    return json.dumps(str(path))


def file_data(files: Path, test: bool = False) -> tuple[str, ...]:
    return (f"data.train={q(files / 'train.jsonl')}",) + ((f"data.test={q(files / 'test.jsonl')}",) if test else ())


_seen: dict[tuple[str, tuple[str, ...]], Any] = {}
_runs = itertools.count()


def fingerprint(recipe: str, overrides: tuple[str, ...], where: Path) -> Any:
    """What a run leaves: its metrics without wall-clock figures, the digest of its final
    model's weights and config, the files of its newest checkpoint, or the fault it stopped on."""
    from hpt_dsl import checkpoint as ckpt
    from hpt_dsl.faults import RunFault
    from hpt_dsl.report import is_timing
    from hpt_dsl.train import run_recipe

    key = (recipe, overrides)
    if key in _seen:
        return _seen[key]
    run = where / f"run-{next(_runs)}"
    fault = None
    try:
        run_recipe(ROOT / "recipes" / recipe, overrides=list(overrides), output=run, quiet=True)
    except RunFault as e:
        fault = str(e).replace(str(run), "RUN")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if not is_timing(k) and not k.startswith("eval/seconds")
                and k not in ("eval/tokens_per_s", "eval/samples_per_s")} for r in rows]  # fmt: skip
    final = run / "final-model"
    digest = hashlib.sha256(b"".join((final / n).read_bytes() for n in ("model.safetensors", "config.json")
                                     if (final / n).exists())).hexdigest()  # fmt: skip
    last = ckpt.latest_checkpoint(run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
    inside = {str(p.relative_to(last)): hashlib.sha256(p.read_bytes()).hexdigest()  # the critic's weights too
              for p in sorted(last.rglob("*")) if p.is_file() and p.name not in ("state.json", "manifest.json")
              } if last else {}  # fmt: skip
    _seen[key] = (metrics, digest, names, inside, fault)
    return _seen[key]


# ----- settings shown at the code that consumes them --------------------------------------------


def _vllm_kwargs(key: str, value: Any) -> None:
    """make_engine hands the setting to the vLLM engine."""
    from hpt_dsl.rollout import vllm
    from hpt_dsl.settings import Settings

    seen: list[dict[str, Any]] = []

    class Engine:
        def __init__(self, workdir: Path, **kwargs: Any) -> None:
            seen.append(kwargs)

        def load_weights(self, weights: Any) -> None:
            pass

    mp = pytest.MonkeyPatch()
    mp.setattr(vllm, "VLLMRolloutEngine", Engine)
    try:
        from hpt_dsl.models import build_tiny_tokenizer

        model = _one_layer_model()
        for s in (Settings(), Settings(rollout={"engine": "vllm", key: value})):
            vllm.make_engine(s, model, build_tiny_tokenizer())
    finally:
        mp.undo()
    assert seen[0][key] != seen[1][key] == value


def _engine_is_vllm(_: Path) -> None:
    from hpt_dsl.rollout import base, vllm
    from hpt_dsl.settings import Settings

    mp = pytest.MonkeyPatch()
    mp.setattr(vllm, "make_engine", lambda s, m, t: "vllm engine")
    try:
        assert base.make_rollout_engine(Settings(rollout={"engine": "vllm"}), None, None) == "vllm engine"
    finally:
        mp.undo()


def _server_kwargs(key: str, value: Any, arg: str) -> None:
    """make_engine hands the setting to the rollout server's client (tests/test_vllm_server.py
    runs the client against a real server)."""
    from hpt_dsl.rollout import server
    from hpt_dsl.settings import Settings

    seen: list[dict[str, Any]] = []

    class Engine:
        def __init__(self, address: str, **kwargs: Any) -> None:
            seen.append({"server": address, **kwargs})

        def load_weights(self, weights: Any) -> None:
            pass

    mp = pytest.MonkeyPatch()
    mp.setattr(server, "ServerRolloutEngine", Engine)
    try:
        from hpt_dsl.models import build_tiny_tokenizer

        model = _one_layer_model()
        for extra in ({}, {key: value}):
            rollout = {"engine": "vllm_server", "server": "127.0.0.1:1", **extra}
            server.make_engine(Settings(rollout=rollout), model, build_tiny_tokenizer())
    finally:
        mp.undo()
    assert seen[0][arg] != seen[1][arg] and seen[1][arg] == value


def _one_layer_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1))


def _ds_config(updates: dict[str, Any], base: dict[str, Any] | None = None) -> Callable[[Path], None]:
    def check(files: Path) -> None:
        from hpt_dsl.learner.ds_config import build_config
        from hpt_dsl.settings import Settings

        learner = {"engine": "deepspeed", **(base or {})}
        if updates.get("deepspeed_config") == "ds.json":
            updates["deepspeed_config"] = str(files / "ds.json")
        one = build_config(Settings(learner=learner), 1, False)
        two = build_config(Settings(learner={**learner, **updates}), 1, False)
        assert one != two

    return check


def _deepspeed_learner(files: Path) -> None:
    """One process, learner.engine = deepspeed: DeepSpeed writes the checkpoint."""
    out = files / "ds-run"
    sets = [f"--set={s}" for s in (*BASE, "train.steps=1", "learner.engine=deepspeed")]
    proc = subprocess.run([sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/sft.hpt", *sets, "-o", str(out),
                           "--quiet", "--no-plots"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-000001" / "deepspeed.json").exists()


def _shared_prompts(files: Path) -> None:
    """The learner runs each distinct prompt once (a shared-prompt forward) only when it is on."""
    from hpt_dsl.learner import torch as torch_learner

    calls = [0]
    real = torch_learner.shared_prompt_logits

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch_learner, "shared_prompt_logits", counted)
    try:
        counts = []
        for value in ("true", "false"):
            calls[0] = 0
            sets = expand((*BASE, *SAMPLED, f"learner.share_prompts={value}", "train.steps=1"), files)
            fingerprint("grpo.hpt", sets, files)
            counts.append(calls[0])
    finally:
        mp.undo()
    assert counts[0] > 0 == counts[1], counts


def _largest_micro_batches(key: str, values: tuple[Any, ...], files: Path) -> list[int]:
    """The most rows of a micro-batch in a one-step SFT run of 4 questions, for each value of ``key``."""
    from hpt_dsl.learner.torch import TorchLearner

    sizes: list[int] = []
    real = TorchLearner._micro_batches

    def recorded(self: Any, host: Any, rows: Any) -> Any:
        chunks = real(self, host, rows)
        sizes.extend(len(c) for c in chunks)
        return chunks

    mp = pytest.MonkeyPatch()
    mp.setattr(TorchLearner, "_micro_batches", recorded)
    try:
        seen = []
        for value in values:
            sizes.clear()
            sets = (*BASE, "train.questions=4", "train.mini_batches=1", f"{key}={value}", "train.steps=1")
            fingerprint("sft.hpt", expand(sets, files), files)
            seen.append(max(sizes))
    finally:
        mp.undo()
    return seen


def _micro_batches(files: Path) -> None:
    """The learner's forward passes come in chunks of train.micro_batch rows (the gradient they
    accumulate is the same; the memory a pass takes is not)."""
    seen = _largest_micro_batches("train.micro_batch", (4, 1), files)
    assert seen == [4, 1], seen


def _fused_calls(sets: tuple[str, ...], files: Path) -> list[Any]:
    """The ``chunk`` argument of each call of the fused log-prob kernel in a one-step SFT run."""
    from hpt_dsl.learner import torch as torch_learner

    chunks: list[Any] = []
    real = torch_learner.fused_token_logprobs

    def counted(*args: Any, **kwargs: Any) -> Any:
        chunks.append(kwargs.get("chunk"))
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch_learner, "fused_token_logprobs", counted)
    try:
        fingerprint("sft.hpt", expand((*BASE, "train.steps=1", *sets), files), files)
    finally:
        mp.undo()
    return chunks


def _fused_logprob(files: Path) -> None:
    """The learner computes the log-probs from the hidden states and the head only when it is on."""
    assert len(_fused_calls(("learner.fused_logprob=true",), files)) > 0
    assert _fused_calls(("learner.fused_logprob=false",), files) == []


def _logprob_chunk(files: Path) -> None:
    """The fused kernel's chunk is the setting (the numbers do not change, the memory does)."""
    assert set(_fused_calls(("learner.logprob_chunk=3",), files)) == {3}
    assert set(_fused_calls(("learner.logprob_chunk=5",), files)) == {5}


def _gradient_checkpointing(files: Path) -> None:
    """The policy's layers are checkpointed only when it is on (and the critic's: PPO)."""
    from transformers import PreTrainedModel

    enabled: list[str] = []
    real = PreTrainedModel.gradient_checkpointing_enable

    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        enabled.append(type(self).__name__)
        return real(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(PreTrainedModel, "gradient_checkpointing_enable", recorded)
    try:
        seen = []
        for value in ("true", "false"):
            enabled.clear()
            fingerprint("ppo.hpt", expand((*BASE, *SAMPLED, f"learner.gradient_checkpointing={value}",
                                           "train.steps=1"), files), files)  # fmt: skip
            seen.append(sorted(enabled))
    finally:
        mp.undo()
    assert seen == [["LlamaForCausalLM", "LlamaModel"], []], seen


def _micro_batch_tokens(files: Path) -> None:
    """A token budget splits the learner's passes into smaller micro-batches."""
    seen = _largest_micro_batches("train.micro_batch_tokens", (1000, 20), files)
    assert seen[0] == 4 > seen[1], seen


def _output_dir(files: Path) -> None:
    from hpt_dsl.train import run_recipe

    out = files / "from-output-dir"
    run_recipe(ROOT / "recipes/sft.hpt", overrides=[*BASE, "train.steps=1", f"train.output_dir={q(out)}"], quiet=True)
    assert (out / "metrics.jsonl").exists()


def _threads(_: Path) -> None:
    from hpt_dsl.settings import Settings
    from hpt_dsl.train import cpu_threads

    assert cpu_threads(Settings(train={"threads": 3})) == 3 != cpu_threads(Settings())


def _trackers(sets: tuple[str, ...], check: Callable[[Path], None]) -> Callable[[Path], None]:
    """A one-step run with ``sets`` (hpt_dsl.trackers); ``check(run folder)`` asserts what it wrote."""

    def probe(files: Path) -> None:
        from hpt_dsl.train import run_recipe

        out = files / f"trackers-{next(_runs)}"
        mp = pytest.MonkeyPatch()
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            run_recipe(ROOT / "recipes/sft.hpt", overrides=[*BASE, "train.steps=1", *sets], output=out, quiet=True)
        finally:
            mp.undo()
        check(out)

    return probe


def _tensorboard_events(run: Path) -> None:
    assert list((run / "tensorboard").glob("events.*"))


def _mlflow_experiment(run: Path) -> None:
    """The MLflow run is in the experiment log.project names."""
    from mlflow.tracking import MlflowClient

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = MlflowClient((run / "mlruns").resolve().as_uri())
        (experiment,) = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    finally:
        mp.undo()
    assert experiment.name == "knobs"


FILE = "@file"  # replaced by file_data(files)
FILE_TEST = "@file+test"
SAMPLED = (FILE_TEST, "data.reward=knob_rewards:parity")  # rewards, and so updates, that depend on the samples

EFFECT: dict[str, Case | Probe] = {
    "model.name": Case("model.name=@other-tiny"),
    "model.dtype": Case("model.dtype=bfloat16"),
    "model.system_prompt": Case('model.system_prompt="Answer with one number."'),
    "model.prompt_template": Case('model.prompt_template="Q: {question} A:"'),
    "model.rope_theta": Case("model.rope_theta=100.0"),
    "model.max_position_embeddings": Case("model.max_position_embeddings=256"),  # the final model's config
    "data.train": Case(f"data.train={FILE}"),
    "data.test": Case("data.test=@one"),
    "data.question_key": Case("data.question_key=q2", (FILE,)),
    "data.answer_key": Case("data.answer_key=a2", (FILE, "data.reward=knob_rewards:value")),
    "data.demo_key": Case("data.demo_key=s2", (FILE,)),
    "data.max_train": Case("data.max_train=3", (FILE,)),
    "data.max_test": Case("data.max_test=1"),
    "data.reward": Case("data.reward=knob_rewards:one", (FILE,)),
    "data.reward_timeout": Case("data.reward_timeout=0.05", (FILE, "data.reward=knob_rewards:slow",
                                                             "data.reward_workers=1")),
    "data.reward_workers": Case("data.reward_workers=1", (FILE, "data.reward=knob_rewards:where")),
    "rollout.engine": Probe(_engine_is_vllm, "vLLM is not installed in this environment"),
    "rollout.dtype": Case("rollout.dtype=bfloat16", (*SAMPLED, "rollout.tis_cap=2.0"), recipe="grpo.hpt"),
    "rollout.n": Case("rollout.n=3"),
    "rollout.temperature": Case("rollout.temperature=0.5", recipe="sft.hpt"),  # the learner's log-probs at tau
    "rollout.top_p": Case("rollout.top_p=0.5", SAMPLED, recipe="grpo.hpt"),
    "rollout.top_k": Case("rollout.top_k=3", SAMPLED, recipe="grpo.hpt"),
    "rollout.max_new_tokens": Case("rollout.max_new_tokens=3"),
    "rollout.old_logprobs": Case("rollout.old_logprobs=engine", (*SAMPLED, "train.epochs=2"), recipe="grpo.hpt"),
    "rollout.tis_cap": Case("rollout.tis_cap=0.5", SAMPLED, recipe="grpo.hpt"),
    "rollout.dynamic_sampling": Case("rollout.dynamic_sampling=true", recipe="grpo.hpt"),
    "rollout.max_sampling_rounds": Case("rollout.max_sampling_rounds=1", ("rollout.dynamic_sampling=true",),
                                        recipe="grpo.hpt"),
    "rollout.overlong_cache": Case("rollout.overlong_cache=3", recipe="grpo.hpt"),
    "rollout.overlong_penalty": Case("rollout.overlong_penalty=0.5", ("rollout.overlong_cache=3",),
                                     recipe="grpo.hpt"),
    "rollout.mask_truncated": Case("rollout.mask_truncated=true", recipe="grpo.hpt"),
    "rollout.gpu_memory_utilization": Probe(lambda _: _vllm_kwargs("gpu_memory_utilization", 0.9)),
    "rollout.sleep_between_steps": Probe(lambda _: _vllm_kwargs("sleep_between_steps", False)),
    "rollout.max_model_len": Probe(lambda _: _vllm_kwargs("max_model_len", 256)),
    "rollout.tensor_parallel_size": Probe(lambda _: _vllm_kwargs("tensor_parallel_size", 2)),
    "rollout.server": Probe(lambda _: _server_kwargs("server", "10.0.0.5:8000", "server")),
    "rollout.server_dir": Probe(lambda _: _server_kwargs("server_dir", "/shared/sync", "shared_dir")),
    "rollout.server_timeout": Probe(lambda _: _server_kwargs("server_timeout", 30.0, "timeout")),
    "learner.engine": Probe(_deepspeed_learner),
    "learner.precision": Case("learner.precision=bf16"),
    "learner.zero_stage": Probe(_ds_config({"zero_stage": 2})),
    "learner.offload": Probe(_ds_config({"offload": True}, {"zero_stage": 2})),
    "learner.deepspeed_config": Probe(_ds_config({"deepspeed_config": "ds.json"})),
    "learner.share_prompts": Probe(_shared_prompts),
    "learner.fused_logprob": Probe(_fused_logprob),
    "learner.logprob_chunk": Probe(_logprob_chunk, "the chunk changes the memory, not the numbers"),
    "learner.gradient_checkpointing": Probe(_gradient_checkpointing, "recomputing activations changes the memory"),
    "critic.lr": Case("critic.lr=0.5", SAMPLED, recipe="ppo.hpt"),
    "critic.value_clip": Case("critic.value_clip=0.01", (*SAMPLED, "train.epochs=2"), recipe="ppo.hpt"),
    "critic.coef": Case("critic.coef=3.0", SAMPLED, recipe="ppo.hpt"),
    "train.steps": Case("train.steps=3"),
    "train.questions": Case("train.questions=3"),
    "train.mini_batches": Case("train.mini_batches=1"),
    "train.micro_batch": Probe(_micro_batches),
    "train.micro_batch_tokens": Probe(_micro_batch_tokens),
    "train.epochs": Case("train.epochs=2"),
    "train.lr": Case("train.lr=0.02"),
    "train.warmup_steps": Case("train.warmup_steps=0"),
    "train.schedule": Case("train.schedule=constant"),
    "train.weight_decay": Case("train.weight_decay=0.5"),
    "train.betas": Case("train.betas=(0.5, 0.9)"),
    "train.grad_clip": Case("train.grad_clip=0.01"),
    "train.seed": Case("train.seed=1"),
    "train.eval_every": Case("train.eval_every=0"),
    "train.eval_n": Case("train.eval_n=2"),
    "train.save_every": Case("train.save_every=0"),
    "train.keep_checkpoints": Case("train.keep_checkpoints=1"),
    "train.output_dir": Probe(_output_dir),
    "train.max_bad_steps": Case("train.max_bad_steps=1", ("train.lr=1e18", "train.steps=4", "train.eval_every=0"),
                                recipe="sft.hpt"),
    "train.threads": Probe(_threads, "CPU threads change the speed, not the numbers"),
    "eval.temperature": Case("eval.temperature=0.1", SAMPLED),
    "eval.top_p": Case("eval.top_p=0.5", SAMPLED),
    "eval.max_new_tokens": Case("eval.max_new_tokens=3"),
    "eval.reward": Case("eval.reward=knob_rewards:one", (FILE_TEST,)),
    "log.to": Probe(_trackers(("log.to=tensorboard",), _tensorboard_events)),
    "log.project": Probe(_trackers(("log.to=mlflow", "log.project=knobs"), _mlflow_experiment)),
}

IGNORED: list[tuple[str, Case]] = [
    ("data.reward", Case("data.reward=nosuchmod.fn")),  # the issue's example: the built-in task
    ("data.reward_timeout", Case("data.reward_timeout=0.5")),
    ("data.reward_workers", Case("data.reward_workers=2")),
    ("eval.reward", Case("eval.reward=knob_rewards:one")),
    ("data.question_key", Case("data.question_key=q2")),
    ("data.answer_key", Case("data.answer_key=a2")),
    ("data.demo_key", Case("data.demo_key=s2")),
    ("data.demo_key", Case("data.demo_key=s2", (FILE,), recipe="grpo.hpt")),
    ("data.max_test", Case("data.max_test=1", (FILE,))),
    ("train.eval_every", Case("train.eval_every=0", (FILE,))),
    ("train.eval_n", Case("train.eval_n=2", (FILE,))),
    ("eval.temperature", Case("eval.temperature=0.1", (FILE,))),
    ("eval.top_p", Case("eval.top_p=0.5", (FILE,))),
    ("eval.max_new_tokens", Case("eval.max_new_tokens=3", (FILE,))),
    ("eval.reward", Case("eval.reward=knob_rewards:one", (FILE,))),
    ("data.reward_timeout", Case("data.reward_timeout=0.5", (FILE, "data.reward=knob_rewards:one"))),
    ("data.reward_workers", Case("data.reward_workers=2", (FILE,))),
    ("rollout.n", Case("rollout.n=3", recipe="sft.hpt")),
    ("rollout.top_p", Case("rollout.top_p=0.5", recipe="sft.hpt")),
    ("rollout.top_k", Case("rollout.top_k=3", recipe="sft.hpt")),
    ("rollout.tis_cap", Case("rollout.tis_cap=0.5", recipe="sft.hpt")),
    ("rollout.old_logprobs", Case("rollout.old_logprobs=engine", recipe="sft.hpt")),
    ("rollout.old_logprobs", Case("rollout.old_logprobs=engine", ("train.epochs=2",), recipe="reinforce.hpt")),
    ("rollout.max_new_tokens", Case("rollout.max_new_tokens=3", recipe="sft.hpt")),
    ("rollout.dynamic_sampling", Case("rollout.dynamic_sampling=true", recipe="sft.hpt")),
    ("rollout.overlong_cache", Case("rollout.overlong_cache=3", recipe="sft.hpt")),
    ("rollout.mask_truncated", Case("rollout.mask_truncated=true", recipe="sft.hpt")),
    ("rollout.max_sampling_rounds", Case("rollout.max_sampling_rounds=1", recipe="grpo.hpt")),
    ("rollout.overlong_penalty", Case("rollout.overlong_penalty=0.5", recipe="grpo.hpt")),
    ("rollout.gpu_memory_utilization", Case("rollout.gpu_memory_utilization=0.9")),
    ("rollout.sleep_between_steps", Case("rollout.sleep_between_steps=false")),
    ("rollout.max_model_len", Case("rollout.max_model_len=256")),
    ("rollout.tensor_parallel_size", Case("rollout.tensor_parallel_size=2")),
    ("rollout.server", Case('rollout.server="127.0.0.1:1"')),
    ("rollout.server_dir", Case('rollout.server_dir="sync"')),
    ("rollout.server_timeout", Case("rollout.server_timeout=30")),
    ("learner.zero_stage", Case("learner.zero_stage=2")),
    ("learner.offload", Case("learner.offload=true")),
    ("learner.deepspeed_config", Case('learner.deepspeed_config="ds.json"')),
    ("learner.share_prompts", Case("learner.share_prompts=false", ("learner.engine=deepspeed",
                                                                    "learner.zero_stage=3"), run=False)),
    ("learner.share_prompts", Case("learner.share_prompts=false", ("learner.gradient_checkpointing=true",))),
    ("learner.logprob_chunk", Case("learner.logprob_chunk=4", ("learner.fused_logprob=false",))),
    ("critic.lr", Case("critic.lr=0.5")),
    ("critic.value_clip", Case("critic.value_clip=0.01")),
    ("critic.coef", Case("critic.coef=3.0")),
    ("train.warmup_steps", Case("train.warmup_steps=0", ("train.schedule=constant",))),
    ("model.system_prompt", Case('model.system_prompt="Be brief."', ('model.prompt_template="Q: {question} A:"',))),
    ("log.project", Case("log.project=knobs", ("log.to=tensorboard",))),
]


def expand(items: tuple[str, ...], files: Path) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        if item == FILE:
            out += file_data(files)
        elif item == FILE_TEST:
            out += file_data(files, test=True)
        else:
            out.append(item.replace(f"={FILE_TEST}", f"={q(files / 'test.jsonl')}")
                       .replace(f"={FILE}", f"={q(files / 'train.jsonl')}")
                       .replace("=@other-tiny", f"={q(files / 'other-tiny')}")
                       .replace("=@one", f"={q(files / 'one.jsonl')}")
                       .replace('="ds.json"', f"={q(files / 'ds.json')}"))
    return tuple(out)


def every_setting() -> list[str]:
    return [f"{s}.{k}" for s, model in SECTIONS.items() for k in model.model_fields]


def test_every_setting_has_a_case() -> None:
    assert sorted(EFFECT) == sorted(every_setting())
    rule_keys = {k for rule in knobs.RULES for k in rule.keys}
    assert rule_keys <= set(every_setting())
    assert rule_keys <= {k for k, _ in IGNORED}


@pytest.mark.parametrize("key", sorted(k for k, _ in {(k, None) for k, _ in IGNORED}))
def test_each_ignore_rule_has_a_configuration_where_it_holds(key: str, files: Path) -> None:
    """Every rule of knobs.RULES that covers ``key`` holds in one of the IGNORED runs."""
    from hpt_dsl.lang.rules import needs

    cases = [c for k, c in IGNORED if k == key]
    for rule in (r for r in knobs.RULES if key in r.keys):
        held = False
        for case in cases:
            recipe = load_recipe(ROOT / "recipes" / case.recipe, overrides=list(expand((*BASE, *case.base, case.alt),
                                                                                      files)))
            held |= rule.when(recipe.settings, needs(recipe.loss))
        assert held, (key, rule.why)


@pytest.mark.slow
@pytest.mark.parametrize("key", every_setting())
def test_the_setting_changes_the_run(key: str, files: Path) -> None:
    effect = EFFECT[key]
    if isinstance(effect, Probe):
        effect.check(files)
        return
    base = expand((*BASE, *effect.base), files)
    changed = expand((*BASE, *effect.base, effect.alt), files)
    recipe = load_recipe(ROOT / "recipes" / effect.recipe, overrides=list(changed))
    assert not [d for d in recipe.warnings if key in d.message], recipe.warnings  # not warned where it acts
    assert fingerprint(effect.recipe, changed, files) != fingerprint(effect.recipe, base, files), key


@pytest.mark.slow
@pytest.mark.parametrize(("key", "case"), IGNORED, ids=[f"{k}-{c.recipe}-{len(c.base)}" for k, c in IGNORED])
def test_where_the_setting_does_nothing_the_checker_says_so(key: str, case: Case, files: Path) -> None:
    base = expand((*BASE, *case.base), files)
    changed = expand((*BASE, *case.base, case.alt), files)
    recipe = load_recipe(ROOT / "recipes" / case.recipe, overrides=list(changed))
    said = [d for d in recipe.warnings if d.code == "W032" and key in d.message]
    assert len(said) == 1 and "has no effect" in said[0].message, recipe.warnings
    if any(key in rule.keys for rule in knobs.RULES):
        assert said[0].file == "--set" and said[0].line is not None  # at the --set that gave it
    if case.run:
        assert fingerprint(case.recipe, changed, files) == fingerprint(case.recipe, base, files), key


def test_a_critic_block_without_gae_is_warned_about(tmp_path: Path) -> None:
    from hpt_dsl.lang import check

    path = tmp_path / "r.hpt"
    path.write_text("loss = grpo\ncritic { }\n")
    said = [d for d in check(path) if d.code == "W032" and "critic block" in d.message]
    assert len(said) == 1 and said[0].line == 2


def run_sft(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    """``hpt-dsl run recipes/sft.hpt`` for one step with ``BASE`` and ``sets``, into tmp_path/run."""
    proc = subprocess.run(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/sft.hpt",
         *[f"--set={s}" for s in (*BASE, "train.steps=1", *sets)], "-o", str(tmp_path / "run"), "--quiet",
         "--no-plots"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_output_dir_beside_output_is_warned_about_at_run_start(tmp_path: Path) -> None:
    proc = run_sft(tmp_path, f"train.output_dir={q(tmp_path / 'elsewhere')}")
    assert "train.output_dir" in proc.stderr and "has no effect" in proc.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_the_issue_example_is_warned_at_run_start(tmp_path: Path) -> None:
    """`--set data.reward=nosuchmod.fn` with the built-in task: a W032 line before the run starts."""
    proc = run_sft(tmp_path, "data.reward=nosuchmod.fn")
    (line,) = [x for x in proc.stderr.splitlines() if "data.reward" in x]
    assert "warning[W032]" in line and "has no effect" in line and "built-in task" in line
