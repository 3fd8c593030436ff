"""Run settings: one pydantic model per recipe section.

A recipe may set any of these in a block, e.g. ``rollout { n = 8  temperature = 1.0 }``,
and the command line may override them with ``--set rollout.n=8``. Every field has a
default, so a recipe can be a single ``loss = ...`` line.

Unknown keys are rejected (``extra="forbid"``) so that a misspelt knob is an error,
never a silent no-op.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSettings(_Section):
    """[model] which policy to post-train."""

    name: str = Field(
        "tiny", description="'tiny' (built-in), an alias such as 'smollm2-135m', a local path or a hub name"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    system_prompt: str | None = Field(None, description="system message put before every question; None = none")
    prompt_template: str | None = Field(
        None, description="raw prompt with a {question} slot, used instead of the chat template"
    )
    rope_theta: float | None = Field(None, description="override of the model config's rope_theta")
    max_position_embeddings: int | None = Field(None, gt=0)


class DataSettings(_Section):
    """[data] questions, demonstrations and answers."""

    train: str = Field("arith", description="'arith' (built-in task) or a JSONL / Parquet file or hub dataset")
    test: str | None = Field(None, description="held-out set; None = the built-in task's test split")
    question_key: str | None = None
    answer_key: str | None = None
    demo_key: str | None = None
    max_train: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)
    reward: str = Field("boxed", description="'boxed', 'math_verify' or a 'module:function' import path")
    reward_timeout: float = Field(5.0, gt=0)
    reward_workers: int | None = Field(
        None, ge=0, description="processes scoring rewards; None = min(4, cpus) for math_verify, else in-process"
    )


class RolloutSettings(_Section):
    """[rollout] how the policy samples its own answers."""

    engine: Literal["hf", "vllm", "vllm_server"] = Field(
        "hf",
        description="hf: transformers' model in the learner's process; vllm: an in-process vLLM engine on every "
        "process; vllm_server: a remote vLLM server at rollout.server (docs/vllm.md)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the rollout engine's precision; None = model.dtype. vllm: its weights; hf (which samples "
        "with the learner's weights): autocast to it, when lower than theirs",
    )
    n: int = Field(4, ge=1, description="rollouts per question (the group size)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering")
    max_new_tokens: int = Field(32, ge=1)
    old_logprobs: Literal["learner", "engine"] = Field(
        "learner", description="where pi_old comes from: a learner forward pass, or the engine's own log-probs"
    )
    tis_cap: float | None = Field(
        None, gt=0, description="truncated importance sampling cap C: weight min(pi_learner/pi_engine, C)"
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: drop questions whose rollouts' rewards all agree and sample "
        "more questions until the step has train.questions informative ones",
    )
    max_sampling_rounds: int = Field(
        10, ge=1, description="dynamic sampling: generation rounds per step at most, the first included"
    )
    overlong_cache: int = Field(
        0,
        ge=0,
        description="DAPO's overlong reward shaping: a soft length penalty over the last L_cache tokens "
        "of rollout.max_new_tokens; 0 = off",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="factor of the overlong length penalty")
    mask_truncated: bool = Field(
        False, description="responses cut at rollout.max_new_tokens get no loss weight (overlong filtering)"
    )
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    sleep_between_steps: bool = True
    max_model_len: int | None = Field(
        None, gt=0, description="vLLM: longest prompt + response it holds; None = the model's maximum"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: processes (consecutive ranks) per engine; divides the number of processes"
    )
    server: str | None = Field(
        None, description='vllm_server: the server\'s "host:port" (or URL); it must run hpt-dsl\'s worker extension'
    )
    server_dir: str | None = Field(
        None, description="vllm_server: a folder the server can read (a shared file system); weight syncs go "
        "through files there instead of the HTTP requests",
    )
    server_timeout: float = Field(600.0, gt=0, description="vllm_server: seconds a request may take")


class LearnerSettings(_Section):
    """[learner] what executes the updates."""

    engine: Literal["torch", "deepspeed"] = "torch"
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = Field(0, ge=0, le=3)
    offload: bool = False
    deepspeed_config: str | None = Field(None, description="JSON file whose keys override the generated config")
    share_prompts: bool = Field(
        True, description="run each distinct prompt of a micro-batch once and share its KV cache"
    )
    fused_logprob: bool = Field(
        True,
        description="log-probs and entropy from the last hidden states and the output head in chunks of "
        "tokens, never the (tokens x vocabulary) logits; false = the model's logits (models without a head "
        "always get them)",
    )
    logprob_chunk: int | None = Field(
        None, gt=0, description="tokens per chunk of the fused log-prob path; None = 64 MiB of float32 logits "
        "on a CPU, 256 MiB on a GPU",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the policy's and the critic's layer activations in the backward pass "
        "instead of keeping them (less memory, about one more forward pass of time)",
    )


class CriticSettings(_Section):
    """[critic] a value model for adv=gae (its presence enables it)."""

    lr: float = Field(1e-3, gt=0)
    value_clip: float = Field(0.2, gt=0)
    coef: float = Field(0.5, gt=0)


class TrainSettings(_Section):
    """[train] the optimisation loop."""

    steps: int = Field(300, ge=1)
    questions: int = Field(32, ge=1, description="questions sampled per step")
    mini_batches: int = Field(
        2, ge=1, description="optimizer steps per rollout batch per epoch (the HPT paper: 2, so the clip acts)"
    )
    micro_batch: int = Field(64, ge=1, description="sequences per forward/backward (gradient accumulation)")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="token budget of a micro-batch: rows sorted by length are packed so that each "
        "micro-batch's padded tokens stay within it (a longer row alone); None = rows only (train.micro_batch)",
    )
    epochs: int = Field(1, ge=1, description="update epochs over each rollout batch")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "warmup", "cosine"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int = Field(25, ge=0, description="0 = evaluate only at the end")
    eval_n: int = Field(1, ge=1, description="samples per test question (pass@k / avg@k)")
    save_every: int = Field(50, ge=0)
    keep_checkpoints: int = Field(
        2, ge=1, description="complete checkpoints kept, newest first (1 leaves no fallback for a damaged one)"
    )
    output_dir: str | None = None
    max_bad_steps: int = Field(3, ge=1, description="consecutive non-finite steps before the run stops")
    threads: int | None = Field(
        None,
        ge=0,
        description="torch CPU threads for `hpt-dsl run`; None = 1 for the built-in tiny model (its "
        "matrices are too small to share between cores), torch's default otherwise; 0 = torch's default",
    )


class EvalSettings(_Section):
    """[eval] how the held-out evaluation samples (defaults as in the HPT paper's evaluation).

    k = train.eval_n samples per question; avg@k and pass@k are reported.
    """

    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, description="None = rollout.max_new_tokens")
    reward: str | None = Field(None, description="None = data.reward")


class LogSettings(_Section):
    """[log] experiment trackers that receive every metrics line, the config and the figures."""

    to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = Field(
        (),
        description="trackers, any of tensorboard, wandb, mlflow (--set log.to=tensorboard,wandb); "
        "() = metrics.jsonl only",
    )
    project: str = Field("hpt-dsl", min_length=1, description="the W&B project and the MLflow experiment")

    @field_validator("to", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """``tensorboard,wandb`` (the command line's form) is the list of both."""
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "data": DataSettings,
    "rollout": RolloutSettings,
    "learner": LearnerSettings,
    "critic": CriticSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "log": LogSettings,
}


class Settings(BaseModel):
    """All sections. ``critic`` is None unless the recipe has a ``critic { }`` block."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    critic: CriticSettings | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    log: LogSettings = Field(default_factory=LogSettings)
