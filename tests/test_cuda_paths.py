"""What runs differently on CUDA, checked on the CPU: sampling in lockstep on a ZeRO-3 model
over two processes (gloo), the ZeRO-3 model partitioned without moving it whole, the rollout
engine's own dtype, vLLM's wake-up after the cache is emptied, and CUDA RNG states restored
in device order."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpt_dsl import checkpoint as ckpt
from hpt_dsl import dist, models
from hpt_dsl.rollout.base import Rollout, SamplingParams
from hpt_dsl.rollout.hf import HFRolloutEngine
from hpt_dsl.settings import Settings

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    path = models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return (path, *models.load_local(path))


# ----- lockstep sampling on a ZeRO-3 model ---------------------------------------------------


def _share(rank: int) -> list[list[int]]:
    """Rank 0 samples three prompts (two calls of the sampling loop), rank 1 one prompt."""
    return PROMPTS[:3] if rank == 0 else PROMPTS[3:]


def _sampler(engine: HFRolloutEngine, rank: int) -> HFRolloutEngine:
    engine.max_sequences = 4  # 2 prompts x n=2 per call: rank 0 makes two calls, rank 1 one
    if rank == 1:  # every token ends a sequence: rank 1 is done after one step, rank 0 is not
        engine.eos_ids = set(range(engine.model.config.vocab_size))
    return engine


def _lockstep_worker(model_dir: str, out_dir: str) -> None:
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    torch.manual_seed(0)
    model, tok = models.load_local(Path(model_dir))
    recipe = load_recipe(text="loss = grpo", overrides=["learner.engine=deepspeed", "learner.zero_stage=3"])
    learner = DeepSpeedLearner(recipe, model, tok)
    rank = dist.rank()
    engine = _sampler(HFRolloutEngine(learner.model, tok), rank)
    assert engine.lockstep and all(hasattr(p, "ds_id") for p in learner.model.parameters())
    forwards = [0]
    learner.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    out: dict[str, Any] = {"rollouts": engine.generate(_share(rank), PARAMS)}
    out["forwards"] = forwards[0]
    out["none"] = engine.generate([] if rank == 1 else PROMPTS[:1], PARAMS)  # a process without prompts
    out["forwards_none"] = forwards[0] - out["forwards"]
    learner.close()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_zero3_over_two_processes_samples_in_lockstep(tiny: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """The hf engine on a ZeRO-3 model partitioned over two processes: the processes have
    different numbers of prompts and of sampling calls, one finishes after the first step and
    one has no prompt at all; both run the same number of forward passes (no hang), and
    each samples what one process with the whole model samples."""
    path, model, tok = tiny
    dist.spawn(_lockstep_worker, 2, str(path), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert got[0]["forwards"] == got[1]["forwards"] > 2
    assert got[0]["forwards_none"] == got[1]["forwards_none"] > 1
    assert got[1]["none"] == []
    for rank in (0, 1):
        alone = _sampler(HFRolloutEngine(copy.deepcopy(model), tok), rank)
        expected = alone.generate(_share(rank), PARAMS)
        _same_rollouts(got[rank]["rollouts"], expected)
    _same_rollouts(got[0]["none"], _sampler(HFRolloutEngine(model, tok), 0).generate(PROMPTS[:1], PARAMS))
    assert all(r.finish_reason == "stop" and len(r.token_ids) == 1 for r in got[1]["rollouts"])
    assert any(len(r.token_ids) > 1 for r in got[0]["rollouts"])


def _same_rollouts(a: list[Rollout], b: list[Rollout]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert (x.prompt_index, x.token_ids, x.finish_reason) == (y.prompt_index, y.token_ids, y.finish_reason)
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def _placement_worker(model_dir: str, out_dir: str) -> None:
    """A ZeRO-3 learner built from a model on the host: which modules were moved whole."""
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    moved: list[int] = []
    to = torch.nn.Module.to

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        moved.append(id(self))
        return to(self, *args, **kwargs)

    torch.manual_seed(0)
    model, tok = models.load_local(Path(model_dir))
    torch.nn.Module.to = spy  # type: ignore[method-assign]
    recipe = load_recipe(text="loss = grpo", overrides=["learner.engine=deepspeed", "learner.zero_stage=3",
                                                         "learner.precision=bf16"])
    learner = DeepSpeedLearner(recipe, model, tok)
    torch.nn.Module.to = to  # type: ignore[method-assign]
    params = list(learner.model.parameters())
    out = {"moved_whole": id(model) in moved, "partitioned": all(hasattr(p, "ds_id") for p in params),
           "local_numel": sum(p.data.numel() for p in params), "dtypes": sorted({str(p.dtype) for p in params}),
           "buffers": sorted({str(b.dtype) for b in learner.model.buffers()})}
    learner.close()
    torch.save(out, Path(out_dir) / "placement.pt")


@pytest.mark.slow
def test_zero3_partitions_the_model_one_parameter_at_a_time(tiny: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """At stage 3 the learner partitions the host model itself: DeepSpeed's engine never moves the
    whole module to the device (it would, for a model not built under zero.Init); the weights
    are cast to bf16 on the host first, the buffers (rotary frequencies) stay float32."""
    dist.spawn(_placement_worker, 1, str(tiny[0]), str(tmp_path))
    out = torch.load(tmp_path / "placement.pt", weights_only=True)
    assert out["partitioned"] and not out["moved_whole"]
    assert out["local_numel"] == 0  # every parameter lives in its partition only
    assert out["dtypes"] == ["torch.bfloat16"] and out["buffers"] == ["torch.float32"]


def test_one_process_samples_without_lockstep(tiny: tuple[Path, Any, Any]) -> None:
    _, model, tok = tiny
    assert not HFRolloutEngine(model, tok).lockstep


# ----- the rollout engine's own precision ---------------------------------------------------


def test_hf_engine_samples_at_rollout_dtype(tiny: tuple[Path, Any, Any]) -> None:
    """rollout.dtype = bfloat16 over float32 weights: the sampler's forwards run under bf16
    autocast (the weights stay the learner's); float32 over bf16 weights is refused."""
    from hpt_dsl.rollout.vllm import RolloutEngineError

    _, model, tok = tiny
    s = Settings()
    s.rollout.dtype = "bfloat16"
    engine = HFRolloutEngine(model, tok, s)
    assert engine.autocast == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    plain = HFRolloutEngine(model, tok)
    seen: list[torch.dtype] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    got = engine.generate(PROMPTS, PARAMS)
    assert set(seen) == {torch.bfloat16} and next(model.parameters()).dtype == torch.float32
    seen.clear()
    expected = plain.generate(PROMPTS, PARAMS)
    hook.remove()
    assert set(seen) == {torch.float32}
    assert len(got) == len(expected) and [r.logprobs for r in got] != [r.logprobs for r in expected]
    s.rollout.dtype = "float32"
    assert HFRolloutEngine(model, tok, s).autocast is None
    with pytest.raises(RolloutEngineError, match="rollout.dtype = float32 but the hf engine samples with the "
                                                 "learner's bfloat16 weights"):
        HFRolloutEngine(copy.deepcopy(model).to(torch.bfloat16), tok, s)


def test_vllm_engine_takes_rollout_dtype_apart_from_the_learner(
        tiny: tuple[Path, Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's dtype is rollout.dtype when set, else model.dtype; the learner's weights keep
    model.dtype."""
    from hpt_dsl.rollout import vllm

    seen: list[str] = []

    class Engine:
        def __init__(self, workdir: Path, **kw: Any) -> None:
            seen.append(kw["dtype"])

        def load_weights(self, named: Any) -> None:
            assert all(t.dtype == torch.float32 for _, t in named)

    _, model, tok = tiny
    monkeypatch.setattr(vllm, "VLLMRolloutEngine", Engine)
    s = Settings()
    vllm.make_engine(s, model, tok)
    s.rollout.dtype = "bfloat16"
    vllm.make_engine(s, model, tok)
    assert seen == ["float32", "bfloat16"]


# ----- vLLM wakes up after the learner's cached blocks are returned ---------------------------


def test_vllm_wakes_up_after_emptying_the_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpt_dsl.rollout.vllm import VLLMRolloutEngine

    calls: list[str] = []

    class LLM:
        def wake_up(self, tags: list[str]) -> None:
            calls.append(f"wake_up {tags}")

    engine = object.__new__(VLLMRolloutEngine)
    engine.llm, engine._asleep = LLM(), {"weights", "kv_cache"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    engine._wake(["weights"])
    engine._wake()
    assert calls == ["empty_cache", "wake_up ['weights']", "empty_cache", "wake_up ['kv_cache']"]
    engine._wake()  # awake: nothing to do
    assert len(calls) == 4


# ----- CUDA RNG states go back to their own devices --------------------------------------------


class _Learner:
    def save(self, path: Path) -> None:
        (path / "policy.txt").write_text("0")

    def load(self, path: Path) -> None:
        pass


def test_cuda_rng_states_are_restored_in_device_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint of a 12-GPU process: the state of cuda10 goes to device 10, not 2."""
    path = ckpt.save_checkpoint(tmp_path, 1, _Learner(), {})
    rng_file = next(p for p in path.iterdir() if p.name.startswith("rng"))
    states = load_file(str(rng_file))
    for i in range(12):
        states[f"cuda{i}"] = torch.full((16,), i, dtype=torch.uint8)
    save_file(states, str(rng_file))
    restored: list[list[int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append([int(t[0]) for t in s]))
    ckpt.load_checkpoint(path, _Learner())
    assert restored == [list(range(12))]
