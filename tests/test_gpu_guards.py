"""Guards for the CUDA paths that CPU tests cannot run, read from the source:

* every tensor factory call (``torch.zeros``, ``torch.arange``, ``torch.tensor``, ...) in the
  training path names its device (``device=``), so that nothing lands on the CPU next to a
  CUDA batch; one that names the CPU itself (``device="cpu"``) is a deliberate host tensor,
  allowed only in the functions listed in ``CPU_ON_PURPOSE`` with the reason;
* no ``torch.inference_mode`` where a forward pass can run on a ZeRO-3 model (DeepSpeed
  gathers its persistent parameters as inference tensors, and the next training forward
  cannot save them for backward); ``torch.no_grad`` instead;
* the learner's and the sampler's passes give the same numbers when every tensor created
  without a device would land on the ``meta`` device: a factory call the source scan cannot
  see (built under another name) fails here too.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hpt_dsl"
TRAINING_PATH = ["learner", "rollout", "estimator", "batch.py", "dist.py", "comm.py", "logprob.py"]
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
             "randperm", "eye", "linspace", "logspace", "empty_strided", "scalar_tensor"}
# (file relative to hpt_dsl/, enclosing function) -> why it builds tensors with device="cpu"
CPU_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("batch.py", "pad_left"): "the loop builds a step's batch from Python lists on the host, then moves it once "
                              "with TrainBatch.to",
    ("batch.py", "pad_right"): "as pad_left",
    ("batch.py", "build_train_batch"): "as pad_left: the per-row labels of the host batch",
    ("comm.py", "sum_metrics"): "Python floats packed for one collective; all_reduce_sum moves them to the "
                                "collective's device",
    ("dist.py", "_offset_groups"): "per-rank group counts on the host; the result is moved to the ids' device",
    ("learner/torch.py", "_no_grad_pass"): "row indices, read on the host with the host copy of the batch",
    ("learner/deepspeed.py", "_filler"): "a one-token batch; _logprobs and _values move what they use",
    ("learner/deepspeed.py", "_module_grad_norm"): "the norm of no gradient, read as a float",
    ("estimator/program.py", "__init__"): "constant gate weights, evaluated once at compile time as floats",
}
ZERO3_PATH = ["rollout", "learner", "train.py", "evaluate.py", "logprob.py", "batch.py", "dist.py", "comm.py"]


def _files(parts: list[str], package: Path = PACKAGE) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        path = package / part
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _calls(path: Path) -> list[tuple[ast.Call, str]]:
    """Every call in ``path`` with the name of the function (or class body) around it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[ast.Call, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else where
            if isinstance(child, ast.Call):
                found.append((child, where))
            visit(child, name)

    visit(tree, "<module>")
    return found


def _torch_attr(func: ast.expr) -> str | None:
    """``name`` for a call of ``torch.name``, else None."""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch":
        return func.attr
    return None


def _names_cpu(value: ast.expr) -> bool:
    """``"cpu"`` or ``torch.device("cpu")``."""
    if isinstance(value, ast.Call) and _torch_attr(value.func) == "device" and value.args:
        value = value.args[0]
    return isinstance(value, ast.Constant) and value.value == "cpu"


def factory_calls_without_device(parts: list[str], package: Path = PACKAGE) -> list[str]:
    """``file:line: torch.f(...) in function: why`` for each factory call with no ``device=``,
    and each one with ``device="cpu"`` outside the allow-list."""
    bad = []
    for path in _files(parts, package):
        rel = path.relative_to(package).as_posix()
        for call, where in _calls(path):
            name = _torch_attr(call.func)
            if name not in FACTORIES or any(k.arg is None for k in call.keywords):
                continue  # not a factory, or **kwargs passed on
            device = next((k.value for k in call.keywords if k.arg == "device"), None)
            if device is None:
                bad.append(f"hpt_dsl/{rel}:{call.lineno}: torch.{name}(...) in {where}() has no device=")
            elif _names_cpu(device) and (rel, where) not in CPU_ON_PURPOSE:
                bad.append(f"hpt_dsl/{rel}:{call.lineno}: torch.{name}(...) in {where}() is put on the CPU "
                           "outside CPU_ON_PURPOSE")
    return bad


def test_every_tensor_factory_in_the_training_path_names_its_device() -> None:
    bad = factory_calls_without_device(TRAINING_PATH)
    assert not bad, "give these the device of the data they meet (the batch's or the model's); a tensor " \
                    "meant for the host takes device=\"cpu\" and an entry in CPU_ON_PURPOSE with the " \
                    "reason:\n" + "\n".join(bad)


def test_the_allow_list_names_only_functions_that_exist() -> None:
    """A stale entry would let a future factory call in a new function of that name through."""
    for (rel, where), reason in CPU_ON_PURPOSE.items():
        path = PACKAGE / rel
        assert path.is_file(), rel
        assert reason
        names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert where in names, f"{rel}: no function {where}"


def test_the_scan_sees_a_factory_without_device(tmp_path: Path) -> None:
    """The scan itself: the CPU-built index of the shared-prompt defect is flagged, and so is a
    CPU tensor outside the allow-list; the fixed line and a ``*_like`` call are not."""
    pkg = tmp_path / "hpt_dsl"
    (pkg / "learner").mkdir(parents=True)
    (pkg / "learner" / "prefix.py").write_text(
        "import torch\n"
        "def distinct_prompts(key, owner, n):\n"
        "    first = torch.full((n,), key.shape[0], dtype=torch.long)\n"
        "    ok = torch.arange(key.shape[0], device=key.device)\n"
        "    same = torch.zeros_like(key)\n"
        "    host = torch.zeros(3, device=torch.device('cpu'))\n"
        "    return first, ok, same, host\n"
    )
    assert factory_calls_without_device(["learner"], pkg) == [
        "hpt_dsl/learner/prefix.py:3: torch.full(...) in distinct_prompts() has no device=",
        "hpt_dsl/learner/prefix.py:6: torch.zeros(...) in distinct_prompts() is put on the CPU outside "
        "CPU_ON_PURPOSE",
    ]


def _uses_inference_mode(path: Path) -> list[int]:
    """Lines of ``path`` that use ``torch.inference_mode`` or ``inference_mode`` in any form."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr == "inference_mode":
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id == "inference_mode":
            lines.append(node.lineno)
        elif isinstance(node, ast.alias) and node.name == "inference_mode":
            lines.append(node.lineno)
    return lines


def test_no_inference_mode_where_a_zero3_model_can_run() -> None:
    bad = [f"hpt_dsl/{p.relative_to(PACKAGE).as_posix()}:{n}" for p in _files(ZERO3_PATH)
           for n in _uses_inference_mode(p)]
    assert not bad, "use torch.no_grad() (ZeRO-3 gathers parameters as inference tensors under " \
                    "inference_mode, and training cannot save them for backward): " + ", ".join(bad)


def test_the_inference_mode_scan_sees_a_decorator(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import torch\n\n@torch.inference_mode()\ndef f():\n    pass\n")
    assert _uses_inference_mode(f) == [3]


# ----- the same passes with every device-less tensor on the meta device -------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from hpt_dsl import models

    return models.load_local(models.build_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0))


def _batch() -> Any:
    """Three questions, four rollouts each and a demonstration: rows share their prompts."""
    from hpt_dsl.batch import build_train_batch
    from hpt_dsl.rollout.base import Rollout

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 100, (3 + q,), generator=g).tolist() for q in range(3)]
    rollouts = [Rollout(q, tuple(torch.randint(5, 100, (2 + j,), generator=g).tolist()), (-1.0,) * (2 + j), "length")
                for q in range(3) for j in range(4)]
    rewards = [1.0 if i in (0, 5) else 0.0 for i in range(12)]
    demos = [torch.randint(5, 100, (4,), generator=g).tolist() + [2] for _ in range(3)]
    return build_train_batch(prompts, rollouts, rewards, demos, [1.0] * 3, pad_id=0)


def _run_learner(base: tuple[Any, Any], text: str, default: str) -> dict[str, Any]:
    """The learner's passes and one update, with ``default`` as torch's default device while
    they run (the learner, program and batch are made before, on the CPU)."""
    from hpt_dsl.estimator import compile_recipe
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.learner.prefix import distinct_prompts
    from hpt_dsl.learner.torch import TorchLearner

    torch.manual_seed(0)
    recipe = load_recipe(text=text, overrides=["train.micro_batch=5"])
    learner = TorchLearner(recipe, copy.deepcopy(base[0]), base[1])
    program = compile_recipe(recipe)
    batch = _batch()
    assert distinct_prompts(batch) is not None  # the shared-prompt forward runs
    with torch.device(default):
        out: dict[str, Any] = {"policy": learner.logprobs(batch)}
        kw: dict[str, Any] = {"old_logprobs": out["policy"]}
        if learner.ref is not None:
            out["ref"] = kw["ref_logprobs"] = learner.logprobs(batch, "ref")
        if learner.critic is not None:
            out["values"] = kw["values"] = learner.values(batch)
        prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards,
                               group_ids=batch.group_ids, is_demo=batch.is_demo, **kw)
        res = learner.update(batch, program, prep)
    assert learner.share_prompts and not res.skipped
    out.update(metrics=res.metrics, grad_norm=res.grad_norm, tokens=res.tokens,
               params=[p.detach().clone() for p in learner.model.parameters()])
    return out


@pytest.mark.parametrize("text", ["loss = if acc > 0 then grpo kl=k3(0.05) else sft", "loss = ppo\ncritic { }"])
def test_learner_creates_no_tensor_without_a_device(base: tuple[Any, Any], text: str) -> None:
    """GRPO with KL and SFT (policy and reference passes, shared prompts), PPO (critic): the
    same log-probs, values, metrics and weights with the default device set to ``meta``."""
    plain = _run_learner(base, text, "cpu")
    meta = _run_learner(base, text, "meta")
    for key in ("policy", "ref", "values"):
        if key in plain:
            assert meta[key].device.type == "cpu" and torch.equal(meta[key], plain[key]), key
    assert meta["metrics"] == plain["metrics"] and meta["grad_norm"] == plain["grad_norm"]
    assert meta["tokens"] == plain["tokens"] > 0
    for a, b in zip(meta["params"], plain["params"], strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_sampler_creates_no_tensor_without_a_device(base: tuple[Any, Any]) -> None:
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine(base[0], base[1])
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=12, seed=3)
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]
    plain = engine.generate(prompts, params)
    with torch.device("meta"):
        meta = engine.generate(prompts, params)
    assert meta == plain and len(plain) == 9
