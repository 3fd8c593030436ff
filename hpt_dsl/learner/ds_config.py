"""The DeepSpeed configuration of a run: generated from the recipe, overridden by a JSON file.

``build_config(settings, world_size, cuda)`` is checked before any model is loaded, so a bad
override costs a second, not a model load. The generated config (ZeRO stage ``s``, micro-batch
``m``, ``W`` processes, ``A`` accumulation steps)::

    train_micro_batch_size_per_gpu = m = train.micro_batch
    gradient_accumulation_steps    = A = ceil(R / (m * W)),
                                     R = train.questions * rollout.n / train.mini_batches (rows)
    train_batch_size               = m * A * W
    gradient_clipping              = train.grad_clip
    zero_optimization.stage        = learner.zero_stage   (offload: optimizer to CPU, and the
                                                           parameters too at stage 3)
    bf16.enabled                   = learner.precision == "bf16"
    data_types.grad_accum_dtype    = "fp32"  (gradients accumulate over micro-batches in fp32,
                                              also with bf16 weights; DeepSpeed offers that
                                              under ZeRO only, so bf16 needs stage >= 1)
    optimizer                      = AdamW(train.lr, train.betas, train.weight_decay)  on CUDA only;
                                     on CPU the learner passes torch.optim.AdamW instead

A gate decides per step how many rows a mini-batch has, so the learner marks the end of
each mini-batch as the accumulation boundary itself; ``A`` only has to multiply out.

An override (``learner.deepspeed_config``, a JSON object) replaces generated keys, merged
key by key into nested objects. Rules, each broken rule an error naming the key:

- keys the recipe owns must agree with it (change them in the recipe instead):
  ``zero_optimization.stage``, ``bf16.enabled``, ``gradient_clipping``,
  ``train_micro_batch_size_per_gpu``, and on CUDA ``optimizer.params.lr`` / ``betas`` /
  ``weight_decay``;
- ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * W``;
- ``fp16`` is not supported (use bf16); parameter offload needs stage 3, optimizer offload
  stage >= 1;
- everything else is passed to DeepSpeed's own validation, and a top-level key that looks
  like a misspelt DeepSpeed key is an error.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any

from hpt_dsl.errors import SetupError
from hpt_dsl.settings import Settings

Config = dict[str, Any]

ADAM_EPS = 1e-8
"""AdamW's epsilon, the same in every learner."""


class DeepSpeedConfigError(SetupError):
    """A DeepSpeed override that cannot be used; the message says where and what to do
    (bad input: ``hpt-dsl run`` exits with code 2)."""


def accumulation_steps(settings: Settings, world_size: int, micro: int | None = None) -> int:
    """The nominal gradient accumulation steps: ceil(rows per mini-batch / (micro * world))."""
    t = settings.train
    rows = math.ceil(t.questions * settings.rollout.n / t.mini_batches)
    return max(1, math.ceil(rows / ((micro or t.micro_batch) * world_size)))


def generate(settings: Settings, world_size: int, cuda: bool) -> Config:
    """The DeepSpeed config that the recipe's settings imply (see the module docstring)."""
    learner, train = settings.learner, settings.train
    micro = train.micro_batch
    steps = accumulation_steps(settings, world_size)
    zero: Config = {"stage": learner.zero_stage}
    if learner.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if learner.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config: Config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": steps,
        "train_batch_size": micro * steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": learner.precision == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cuda:
        config["optimizer"] = {"type": "AdamW", "params": _adam_params(settings)}
    else:
        config["zero_force_ds_cpu_optimizer"] = False  # torch.optim.AdamW, also with offload
    return config


def _adam_params(settings: Settings) -> Config:
    t = settings.train
    return {"lr": t.lr, "betas": list(t.betas), "eps": ADAM_EPS, "weight_decay": t.weight_decay}


def load_override(path: str | Path) -> Config:
    """The JSON object in ``path``; errors name the file (and line:col for bad JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeepSpeedConfigError(
            f"{p}: DeepSpeed config file not found; fix learner.deepspeed_config or remove it"
        ) from None
    except OSError as err:
        raise DeepSpeedConfigError(f"{p}: cannot read the DeepSpeed config: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{p}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{p}: a DeepSpeed config must be a JSON object {{...}}, "
                                   f"not {type(data).__name__}")
    return data


def merge(base: Config, override: Config) -> Config:
    """base with override's keys replacing its own; nested objects are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _get(config: Config, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _owned(settings: Settings, cuda: bool) -> dict[str, tuple[Any, str]]:
    """key path -> (value the recipe implies, the setting that owns it)."""
    learner, train = settings.learner, settings.train
    owned: dict[str, tuple[Any, str]] = {
        "zero_optimization.stage": (learner.zero_stage, "learner.zero_stage"),
        "bf16.enabled": (learner.precision == "bf16", "learner.precision"),
        "gradient_clipping": (train.grad_clip, "train.grad_clip"),
        "train_micro_batch_size_per_gpu": (train.micro_batch, "train.micro_batch"),
    }
    if cuda:
        owned["optimizer.params.lr"] = (train.lr, "train.lr")
        owned["optimizer.params.betas"] = (list(train.betas), "train.betas")
        owned["optimizer.params.weight_decay"] = (train.weight_decay, "train.weight_decay")
    return owned


def validate(config: Config, override: Config, settings: Settings, world_size: int, cuda: bool,
             source: str = "<override>") -> None:
    """Raise DeepSpeedConfigError for the first rule of the module docstring that is broken."""
    for path, (want, setting) in _owned(settings, cuda).items():
        got = _get(override, path)
        if got is not None and got != want:
            raise DeepSpeedConfigError(
                f"{source}: {path} = {json.dumps(got)} contradicts the recipe's {setting} "
                f"(which implies {json.dumps(want)}); set {setting} in the recipe and drop {path} "
                "from the DeepSpeed config"
            )
    micro = config.get("train_micro_batch_size_per_gpu")
    steps = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", steps),
                       ("train_batch_size", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DeepSpeedConfigError(f"{source}: {key} = {json.dumps(value)} must be a positive integer")
    if total != micro * steps * world_size:
        raise DeepSpeedConfigError(
            f"{source}: train_batch_size = {total} but train_micro_batch_size_per_gpu * "
            f"gradient_accumulation_steps * world size = {micro} * {steps} * {world_size} = "
            f"{micro * steps * world_size}; make them multiply out (e.g. set train_batch_size to "
            f"{micro * steps * world_size}), or drop the batch keys to let them be derived"
        )
    if _get(config, "fp16.enabled"):
        raise DeepSpeedConfigError(f"{source}: fp16 is not supported; set learner.precision = \"bf16\" "
                                   "in the recipe and drop the fp16 section")
    stage = _get(config, "zero_optimization.stage")
    if _get(config, "zero_optimization.offload_param.device") not in (None, "none") and stage != 3:
        raise DeepSpeedConfigError(f"{source}: zero_optimization.offload_param needs ZeRO stage 3 "
                                   f"(learner.zero_stage = {stage}); set learner.zero_stage = 3 or drop it")
    if _get(config, "zero_optimization.offload_optimizer.device") not in (None, "none") and not stage:
        raise DeepSpeedConfigError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 "
                                   "or 3; set learner.zero_stage in the recipe or drop it")
    if not cuda and "optimizer" in override:
        raise DeepSpeedConfigError(f"{source}: an `optimizer` section needs a CUDA machine (DeepSpeed's "
                                   "fused optimizers); on CPU the learner uses torch.optim.AdamW: drop it")
    _check_spelling(override, source)
    _deepspeed_validation(config, source)


def _known_keys() -> set[str]:
    """Every string constant DeepSpeed's config modules define: a superset of its keys."""
    from hpt_dsl.learner.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero import config as zero_config

    known: set[str] = set()
    for module in (constants, zero_config):
        known |= {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)}
    return known


def _check_spelling(override: Config, source: str) -> None:
    known = _known_keys()
    for key in override:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if close:
            raise DeepSpeedConfigError(f"{source}: unknown DeepSpeed key {key!r}; did you mean {close[0]!r}?")


def _deepspeed_validation(config: Config, source: str) -> None:
    """DeepSpeed's own parser (sections such as zero_optimization forbid unknown keys)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = {k: v for k, v in config.items() if k != "train_batch_size"}  # checked above with W
    try:
        DeepSpeedConfig(probe)
    except ValidationError as err:
        first = err.errors()[0]
        section = err.title.replace("DeepSpeed", "").replace("Config", "").lower()
        where = ".".join(str(p) for p in first["loc"])
        prefix = {"zero": "zero_optimization."}.get(section, "")
        raise DeepSpeedConfigError(f"{source}: {prefix}{where}: {first['msg']}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise DeepSpeedConfigError(f"{source}: DeepSpeed rejects the config: {err}") from None


def preflight(settings: Settings) -> Config:
    """The run's DeepSpeed config, checked, and the training loop's own limits: call it before
    loading the model, so that a wrong setting costs a second (world size from the launcher's
    environment)."""
    import torch

    from hpt_dsl import comm

    return build_config(settings, comm.world_size(), torch.cuda.is_available())


def build_config(settings: Settings, world_size: int, cuda: bool) -> Config:
    """generate + the user's override (``learner.deepspeed_config``), validated."""
    config = generate(settings, world_size, cuda)
    path = settings.learner.deepspeed_config
    override: Config = {}
    source = "<generated>"
    if path:
        override = load_override(path)
        source = str(path)
        config = merge(config, override)
        if "train_batch_size" in override and "gradient_accumulation_steps" not in override:
            config["gradient_accumulation_steps"] = _derive_steps(config, world_size)
    if learner_error := _settings_error(settings):
        raise DeepSpeedConfigError(learner_error)
    validate(config, override, settings, world_size, cuda, source)
    return config


def _derive_steps(config: Config, world_size: int) -> Any:
    """gradient_accumulation_steps from an overridden train_batch_size (DeepSpeed's rule)."""
    total, micro = config.get("train_batch_size"), config.get("train_micro_batch_size_per_gpu")
    if isinstance(total, int) and isinstance(micro, int) and micro > 0 and total % (micro * world_size) == 0:
        return total // (micro * world_size)
    return config.get("gradient_accumulation_steps")


def _settings_error(settings: Settings) -> str | None:
    learner = settings.learner
    if learner.offload and learner.zero_stage == 0:
        return "learner.offload = true needs learner.zero_stage >= 1 (ZeRO offloads optimizer state); " \
               "set learner.zero_stage = 2 or 3"
    if learner.precision == "bf16" and learner.zero_stage == 0:
        return "learner.precision = \"bf16\" needs learner.zero_stage >= 1: without ZeRO, DeepSpeed " \
               "accumulates bf16 gradients in bf16; set learner.zero_stage = 1, 2 or 3"
    return None
