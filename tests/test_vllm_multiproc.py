"""vLLM rollouts for a learner over several processes: an engine colocated on every process
(``hpt_dsl.rollout.colocate``), started by torchrun over gloo on this CPU with the DeepSpeed
learner, in the vLLM environment (scripts/setup-vllm; CI's vLLM lane).

Exactness. Every request is seeded by its prompt's place in the step, never by the process
that draws it, so two processes sample at temperature 1 exactly what one process samples
(up to kernel differences between batch sizes, which these runs never turn into another
token). The comparisons are therefore as tight as the DeepSpeed tests' (1e-5 on weights).
``rollout.tis_cap`` makes every step log ``tis/mismatch``, the mean |log pi_learner - log
pi_engine| over every process's rollouts: below 1e-4 only when every engine holds the
learner's weights of that step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

if find_spec("vllm") is None or find_spec("deepspeed") is None:
    pytest.skip("needs vLLM and DeepSpeed: run in the environment made by scripts/setup-vllm",
                allow_module_level=True)

from _vllm_runs import train_rows, write_data  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "rollout.engine=vllm",
    "learner.engine=deepspeed",
    "train.questions=4",
    "rollout.n=2",
    "rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "data.max_test=2",
    "train.micro_batch=2",
    "train.threads=1",
    "train.eval_every=0",
    "train.save_every=1",
    "train.lr=0.003",  # and 1e-5 on weights: as the DeepSpeed tests
    "rollout.tis_cap=2.0",
]
RECIPES = {  # recipe, its extra settings, ZeRO stage
    "grpo": ("grpo.hpt", ["data.reward=mp_rewards:parity"], 2),
    "hpt": ("hpt.hpt", [], 3),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("mp"), "mp_rewards")


def launch(args: list[str], world: int, files: Path) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)] if world > 1 else [
        sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(files), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*launcher, "-m", "hpt_dsl.cli.main", "run", *args, "--quiet", "--no-plots"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


class Runs:
    """Runs shared by the tests of this module (each is minutes on two cores)."""

    def __init__(self, files: Path) -> None:
        self.files = files
        self.done: dict[tuple[str, int, int, tuple[str, ...]], tuple[Path, str]] = {}

    def sets(self, name: str, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
        recipe, own, stage = RECIPES[name]
        data = [f"data.train={self.files / 'train.jsonl'}"] if name == "grpo" else []
        return [f"--set={s}" for s in (*SMALL, *data, *own, f"learner.zero_stage={stage}", f"train.steps={steps}",
                                       *extra)]

    def run(self, name: str, world: int, steps: int = 3, extra: tuple[str, ...] = ()) -> tuple[Path, str]:
        key = (name, world, steps, extra)
        if key not in self.done:
            out = self.files / f"{name}-w{world}-s{steps}-{len(self.done)}"
            proc = launch([str(ROOT / "recipes" / RECIPES[name][0]), *self.sets(name, steps, extra), "-o", str(out)],
                          world, self.files)
            assert proc.returncode == 0, proc.stderr[-4000:]
            self.done[key] = (out, proc.stderr)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(files: Path) -> Runs:
    return Runs(files)


def engines_started(stderr: str) -> int:
    """vLLM engines that joined the learner's processes (vLLM logs one line per engine)."""
    return sum("Using external launcher for distributed inference" in line for line in stderr.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "hpt"])
def test_two_engines_train_as_one_process(runs: Runs, name: str) -> None:
    """GRPO at ZeRO-2 (rewards that differ between samples) and HPT at ZeRO-3: two processes,
    each sampling its two questions with its own engine, end 3 steps with the weights of one
    process sampling all four, every step's rollouts the same and every engine in sync."""
    one, _ = runs.run(name, 1)
    two, stderr = runs.run(name, 2)
    assert engines_started(stderr) == 2
    a = load_file(one / "final-model" / "model.safetensors")
    b = load_file(two / "final-model" / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(one / "base-model" / "model.safetensors")
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3, "the runs must move the weights"
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff
    rows_one, rows_two = train_rows(one), train_rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for x, y in zip(rows_one, rows_two, strict=True):
        assert x["grad_norm"] > 0
        assert y["rows"] == x["rows"]
        for key in ("reward/mean", "response_length", "truncated"):  # the same rollouts
            assert y[key] == x[key], key
        for key in ("loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
        assert y["tis/mismatch"] < 1e-4, "every engine samples with the weights of the step"
    if name == "grpo":
        assert any(r["reward/mean"] not in (0.0, 1.0) for r in rows_two), "rewards must differ within steps"


@pytest.mark.slow
def test_resume_syncs_every_engine(runs: Runs) -> None:
    """Two processes stopped after step 1 and resumed sample step 2 as the unbroken run: each
    engine got the checkpoint's weights (its step-2 log-probs match the learner's)."""
    whole, _ = runs.run("hpt", 2)
    broken, _ = runs.run("hpt", 2, steps=1)
    resumed = launch([str(ROOT / "recipes" / "hpt.hpt"), *runs.sets("hpt", 2), "--resume", str(broken)], 2,
                     runs.files)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = train_rows(whole)[1], train_rows(broken)[-1]
    assert a["step"] == b["step"] == 2
    assert b["tis/mismatch"] < 1e-4, "an engine sampled step 2 from weights other than the checkpoint's"
    for key in ("reward/mean", "response_length", "truncated"):
        assert b[key] == a[key], key
    for key in ("loss", "grad_norm", "tis/mismatch"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def _sync_worker(model_dir: str, out_dir: str) -> None:
    """Two colocated engines: process 1 sends a name its engine lacks in the middle of a sync
    whose every parameter travels with a collective (as a ZeRO-3 gather does); then a full
    sync, and the seed rule: process 1 samples the step's prompt 1 alone."""
    import torch
    import torch.distributed as td

    from hpt_dsl import comm
    from hpt_dsl.models import load_local
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.vllm import RolloutEngineError, make_engine
    from hpt_dsl.settings import Settings

    comm.init("gloo")
    rank = comm.rank()
    model, tok = load_local(Path(model_dir))
    engine = make_engine(Settings(rollout={"engine": "vllm"}), model, tok)

    def stream(bad: bool) -> Any:
        for i, (name, p) in enumerate(model.named_parameters()):
            td.all_reduce(torch.zeros(1))  # one collective per parameter, every process
            yield ("model.no_such.weight" if bad and i == 3 else name), p

    out: dict[str, Any] = {}
    for key, call in (("sync", lambda: engine.load_weights(stream(rank == 1))),
                      ("generate", lambda: engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4)))):
        try:
            call()
            out[key] = "ok"
        except RolloutEngineError as err:
            out[key] = str(err)
    engine.load_weights(stream(False))
    prompts, first = ([[5, 6, 7], [8, 9, 10, 11]], 0) if rank == 0 else ([[8, 9, 10, 11]], 1)
    params = SamplingParams(n=2, max_new_tokens=8, seed=11, first_prompt=first)
    out["rollouts"] = [[r.prompt_index, list(r.token_ids), list(r.logprobs)] for r in engine.generate(prompts, params)]
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_partial_sync_on_one_process_fails_on_every_process(tmp_path: Path) -> None:
    """A sync that fails on one process is refused there (the reason) and on the other (which
    process failed); both engines then refuse to sample until a full sync, so no process
    samples from stale weights. The failing process takes part in the rest of the stream's
    collectives (else the other would hang). After a full sync each prompt is sampled by its
    place in the step: process 1's samples of the step's prompt 1 are process 0's."""
    from hpt_dsl import dist
    from hpt_dsl.models import build_tiny

    path = build_tiny(tmp_path / "tiny", seed=0)
    dist.spawn(_sync_worker, 2, str(path), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "no parameter for a tensor" in got[1]["sync"]
    assert "weight sync failed on process 1" in got[0]["sync"]
    for g in got:
        assert "not a complete copy of the policy" in g["generate"]
    zero, one = got[0]["rollouts"], got[1]["rollouts"]
    assert [r[0] for r in zero] == [0, 0, 1, 1] and [r[0] for r in one] == [0, 0]
    assert zero[0][1] != zero[1][1], "two samples of a prompt differ (temperature 1)"
    for a, b in zip(zero[2:], one, strict=True):
        assert a[1] == b[1]
        assert a[2] == pytest.approx(b[2], abs=1e-5)
