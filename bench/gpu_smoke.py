"""The checks of ``bench/gpu_smoke.sh``, each run in a process of its own.

    python3 bench/gpu_smoke.py plan [--names]          the checks, their time caps, the paths they need
    python3 bench/gpu_smoke.py check NAME              run one check (in the installed package's
                                                       environment: see gpu_smoke.sh), record it
    python3 bench/gpu_smoke.py outcome NAME RC SECONDS LOG   record a check that died or timed out
    python3 bench/gpu_smoke.py summary NAME            its one summary line
    python3 bench/gpu_smoke.py verdict                 exit 1 when a check failed or timed out

Every check writes its entry into the results JSON (``SMOKE_RESULTS``) as soon as it ends,
so a crash or a timeout later still leaves what finished. The module imports only the
standard library at the top: ``plan`` runs anywhere, without torch or hpt-dsl.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


@dataclass(frozen=True)
class Check:
    name: str
    cap_s: int  # the most seconds it may take (the script also keeps the whole run within its budget)
    guards: str  # what it shows, and which defect it would catch


CHECKS = [
    Check("env", 60, "CUDA visible; hpt_dsl imported from the installed copy (not the checkout), its grammar "
                     "found through the package; versions"),
    Check("grpo_shared_prompts", 120, "GRPO on CUDA with the torch learner: rows sharing a prompt give the plain "
                                      "forward's log-probs (shared-prompt forward, every tensor on the batch's "
                                      "device), then 2 steps of the loop"),
    Check("zero3_hf", 150, "recipes/hpt.hpt on DeepSpeed ZeRO-3 bf16 with the hf engine: sampling (no_grad, not "
                           "inference_mode) then training on the same partitioned model; partitioned one "
                           "parameter at a time"),
    Check("zero2_hpt", 180, "recipes/hpt.hpt on DeepSpeed ZeRO-2 bf16: STEPS steps, checkpoint, resume one step, "
                            "the final model loads; tokens/s and peak memory"),
    Check("memory_zero3", 120, "one update of a 1.5B model (Qwen2.5-1.5B's shape) on 8k-token responses, ZeRO-3 "
                               "bf16 with fp32 gradient accumulation, batch and prepare on CUDA: peak memory"),
    Check("memory_zero2", 120, "the same update at ZeRO-2"),
    Check("logprob_memory", 150, "bench/logprob_memory.py on CUDA (V = 151,936, 8,192 tokens, hidden 896, float32, "
                                 "forward + backward with entropy): the fused log-prob path against the plain "
                                 "one, each in its own process; peak memory, time, tokens/s, agreement"),
    Check("vllm_bf16", 150, "if vLLM is installed: GRPO with rollout.engine=vllm, rollout.dtype=bfloat16 over an "
                            "fp32 learner, asleep between steps (empty_cache before wake_up)"),
    Check("vllm_launcher", 180, "if vLLM is installed: GRPO under torchrun (nproc 1) on DeepSpeed ZeRO-3 with "
                                "the colocated vLLM engine (external_launcher in the learner's process group, "
                                "weights gathered one parameter at a time), asleep between steps; the command "
                                "an 8-GPU node runs with --nproc_per_node 8"),
    Check("vllm_server", 240, "if vLLM is installed: vLLM's OpenAI server with hpt-dsl's worker extension on the "
                              "same GPU (memory fraction 0.3), then GRPO under torchrun (nproc 1) on DeepSpeed "
                              "ZeRO-3 with rollout.engine=vllm_server: weights pushed after every step, the "
                              "server's log-probs against the learner's (tis/mismatch)"),
    Check("fused_adam", 90, "DeepSpeed's fused AdamW: JIT build within the cap, then one ZeRO-2 step with it "
                            "(every other check uses torch's AdamW through DeepSpeed)"),
]
BY_NAME = {c.name: c for c in CHECKS}


def needed_paths() -> list[tuple[str, str]]:
    """(path, why) of everything the script uses beyond a clean checkout."""
    work = os.environ.get("WORK", "/tmp/hpt-gpu-smoke")
    out = os.environ.get("OUT")
    return [
        (".whl/*.whl", "wheels of the Python packages missing on the machine (only those; git-ignored: bring "
                       "it along)"),
        (".whl/smollm2-135m/config.json", "optional, with the tokenizer files beside it: SmolLM2-135M's shape "
                                          "with random weights; else the smollm2-135m alias if its weights are "
                                          "cached, else the built-in tiny model"),
        (work, "scratch (WORK): the installed package (site/), runs, torch extensions; made if absent"),
        (out or "bench/results", "the results JSON (OUT when set; made if absent)"),
        (f"{out}/logs" if out else f"{work}/logs", "one log per check (made if absent)"),
    ]


# ----- the results file ------------------------------------------------------------------------


def results_path() -> Path:
    return Path(os.environ["SMOKE_RESULTS"])


def load_results() -> dict[str, Any]:
    path = results_path()
    return json.loads(path.read_text()) if path.exists() else {"checks": {}}


def record(name: str, entry: dict[str, Any]) -> None:
    """Write one check's entry into the results file (atomically: a crash leaves the old file)."""
    data = load_results()
    data.setdefault("checks", {})[name] = entry
    tmp = results_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(results_path())


# ----- helpers the checks share ----------------------------------------------------------------


def model_folder() -> tuple[str, str]:
    """(model.name, what it is): the smollm2-135m alias if its weights are cached, else its
    architecture with random weights from .whl/smollm2-135m, else the built-in tiny model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        from hpt_dsl import hub

        return str(hub.resolve("smollm2-135m")), "smollm2-135m"
    except Exception:  # noqa: BLE001 - not cached: fall through
        pass
    carried = REPO / ".whl" / "smollm2-135m"
    if (carried / "config.json").is_file():
        target = Path(os.environ["WORK"]) / "smollm2-135m-random"
        if not (target / "config.json").is_file():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(carried))
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(carried).save_pretrained(target)
        return str(target), "SmolLM2-135M architecture, random weights"
    return "tiny", "built-in tiny model"


def ds_sets(stage: int) -> list[str]:
    """The DeepSpeed learner at ``stage``, bf16, with torch's AdamW unless OPTIMIZER=fused_adam."""
    sets = ["learner.engine=deepspeed", f"learner.zero_stage={stage}", "learner.precision=bf16"]
    if os.environ.get("OPTIMIZER", "torch_adam") == "torch_adam":
        override = Path(os.environ["WORK"]) / "torch_adam.json"
        override.write_text('{"optimizer": {"params": {"torch_adam": true}}}')
        sets.append(f"learner.deepspeed_config={override}")
    return sets


def run_loop(recipe: str, sets: list[str], run: Path, resume: bool = False) -> list[dict[str, Any]]:
    """``hpt-dsl run`` in this process; the metrics lines of the run's training steps."""
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.train import train

    train(load_recipe(REPO / "recipes" / recipe, overrides=sets), run, resume=resume, quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def loop_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    import torch

    later = rows[1:] or rows
    return {
        "steps": len(rows),
        "s_per_step": statistics.median(r["time/step"] for r in later),
        "generated_tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
        "skipped_steps": sum(bool(r["skipped"]) for r in rows),
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
    }


def loop_sets(model: str, steps: int) -> list[str]:
    return [f"model.name={model}", "train.eval_every=0", "data.max_test=16", "rollout.max_new_tokens=128",
            "train.questions=16", "train.micro_batch=16", f"train.steps={steps}"]


def run_dir(name: str) -> Path:
    import shutil

    path = Path(os.environ["WORK"]) / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    return path


class CheckFailed(AssertionError):
    """A check's own assertion, with the figures that show it."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


# ----- the checks ------------------------------------------------------------------------------


def check_env() -> dict[str, Any]:
    import importlib.resources

    import torch

    import hpt_dsl

    site = Path(os.environ["SMOKE_SITE"]).resolve()
    where = Path(hpt_dsl.__file__).resolve()
    grammar = importlib.resources.files("hpt_dsl.grammar").joinpath("hpt.lark")
    from hpt_dsl.lang import load_recipe

    recipe = load_recipe(REPO / "recipes" / "hpt.hpt")  # parses with the installed grammar
    out: dict[str, Any] = {
        "hpt_dsl": str(where), "installed_copy": site in where.parents, "grammar": str(grammar),
        "recipe_terms": len(recipe.estimators), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "python": sys.version.split()[0],
    }
    for module in ("deepspeed", "transformers", "vllm"):
        try:
            out[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            out[module] = f"not importable: {type(err).__name__}"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
        out["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
        out["bf16"] = torch.cuda.is_bf16_supported()
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GiB
    expect(out["installed_copy"], f"hpt_dsl was imported from {where}, not from the installed copy in {site}")
    expect(site in Path(str(grammar)).resolve().parents, f"the grammar came from {grammar}, not from {site}")
    expect(out["cuda"] or os.environ.get("SMOKE_PROBE") == "1", "no CUDA GPU visible")
    return out


def check_grpo_shared_prompts() -> dict[str, Any]:
    import torch

    from hpt_dsl.batch import build_train_batch
    from hpt_dsl.estimator import compile_recipe
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.learner.prefix import distinct_prompts
    from hpt_dsl.learner.torch import TorchLearner
    from hpt_dsl.models import load_model
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.hf import HFRolloutEngine

    name, what = model_folder()
    recipe = load_recipe(REPO / "recipes" / "grpo.hpt", overrides=[f"model.name={name}", "train.micro_batch=8"])
    torch.manual_seed(0)
    model, tok = load_model(recipe.settings.model, 0, Path(os.environ["WORK"]))
    model = model.to("cuda")
    learner = TorchLearner(recipe, model, tok)
    engine = HFRolloutEngine(model, tok, recipe.settings)
    prompts = [tok(q, add_special_tokens=False).input_ids for q in ("12+35=", "7*8=", "100-42=", "3+4=")]
    rollouts = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=24, seed=1))
    rewards = [float(i % 3 == 0) for i in range(len(rollouts))]
    batch = build_train_batch(prompts, rollouts, rewards, [None] * 4, [0.0] * 4, int(tok.pad_token_id)).to("cuda")
    expect(distinct_prompts(batch) is not None, "the batch has no shared prompt")
    shared = learner.logprobs(batch)
    learner.share_prompts = False
    plain = learner.logprobs(batch)
    learner.share_prompts = True
    diff = float((shared - plain).abs().max())
    program = compile_recipe(recipe)
    prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
                           is_demo=batch.is_demo, old_is_current=True)
    res = learner.update(batch, program, prep)
    expect(diff <= 2e-3, f"shared-prompt log-probs differ from the plain forward's by {diff:.2e}")
    expect(learner.share_prompts and not res.skipped, f"update skipped or shared prompts off: {res}")
    del learner, model, engine
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rows = run_loop("grpo.hpt", loop_sets(name, 2), run_dir("grpo"))
    return {"model": what, "shared_vs_plain_max_abs": diff, "update_grad_norm": res.grad_norm,
            "tokens": res.tokens, **loop_figures(rows)}


def check_zero3_hf() -> dict[str, Any]:
    import torch

    name, what = model_folder()
    torch.cuda.reset_peak_memory_stats()
    rows = run_loop("hpt.hpt", loop_sets(name, 2) + ds_sets(3) + ["train.save_every=0"], run_dir("zero3"))
    out = {"model": what, **loop_figures(rows)}
    expect(out["steps"] == 2 and not out["skipped_steps"], f"steps {out['steps']}, skipped {out['skipped_steps']}")
    return out


def check_zero2_hpt() -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    steps = int(os.environ.get("STEPS", "3"))
    name, what = model_folder()
    run = run_dir("zero2")
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rows = run_loop("hpt.hpt", loop_sets(name, steps) + ds_sets(2) + [f"train.save_every={steps}"], run)
    wall = time.perf_counter() - start
    out = {"model": what, "wall_s": wall, **loop_figures(rows)}
    resumed = run_loop("hpt.hpt", loop_sets(name, steps + 1) + ds_sets(2) + ["train.save_every=0"], run, True)
    out["resumed_steps"] = [r["step"] for r in resumed]
    final = AutoModelForCausalLM.from_pretrained(run / "final-model")
    out["final_model_parameters"] = sum(p.numel() for p in final.parameters())
    expect(out["resumed_steps"] == list(range(1, steps + 2)), f"resumed steps {out['resumed_steps']}")
    return out


def _memory(stage: int) -> dict[str, Any]:
    """One update of a 1.5B model on 8k-token responses, one per micro-batch; ZeRO-3 builds the
    model on the host and lets the learner partition it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hpt_dsl.batch import TrainBatch
    from hpt_dsl.estimator import compile_recipe
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=16384,
                         tie_word_embeddings=True)
    with torch.device("cpu" if stage == 3 else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    r = load_recipe(REPO / "recipes" / "hpt.hpt", overrides=ds_sets(stage) + [
        "train.micro_batch=1", "train.questions=2", "rollout.n=2"])
    torch.cuda.reset_peak_memory_stats()
    learner = DeepSpeedLearner(r, model, tokenizer=None)
    init_peak = torch.cuda.max_memory_allocated() / GiB
    P, T, B = 256, 8192, 2
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(prompt_ids=torch.randint(0, 150000, (B, P), generator=g),
                       prompt_mask=torch.ones(B, P, dtype=torch.long),
                       response_ids=torch.randint(0, 150000, (B, T), generator=g), response_mask=torch.ones(B, T),
                       group_ids=torch.arange(B), is_demo=torch.ones(B, dtype=torch.bool),
                       rewards=torch.ones(B)).to("cuda")
    program = compile_recipe(r)
    prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
                           is_demo=batch.is_demo, old_is_current=True)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = learner.update(batch, program, prep)
    torch.cuda.synchronize()
    out = {"zero_stage": stage, "parameters_b": n_params / 1e9, "rows": B, "tokens_per_row": P + T,
           "update_s": time.perf_counter() - t, "skipped": res.skipped, "grad_norm": res.grad_norm,
           "peak_gpu_after_init_gib": init_peak,
           "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
           "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    expect(not res.skipped, f"the update was skipped (grad norm {res.grad_norm})")
    return out


def check_memory_zero3() -> dict[str, Any]:
    return _memory(3)


def check_memory_zero2() -> dict[str, Any]:
    return _memory(2)


def check_logprob_memory() -> dict[str, Any]:
    """The fused log-prob path's peak memory (torch.cuda) and time against the plain path's,
    and the largest relative difference of their values and gradients."""
    import subprocess

    out = Path(os.environ["WORK"]) / "logprob_memory.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "logprob_memory.py"), "--device", "cuda",
                           "--repeats", "2", "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    print(proc.stdout + proc.stderr)
    expect(proc.returncode == 0, f"bench/logprob_memory.py exited with {proc.returncode}")
    data = json.loads(out.read_text())
    plain, fused, ratios = data["plain"], data["fused"], data["ratios"]
    figures = {"plain_peak_gib": plain["peak_mib"] / 1024, "fused_peak_gib": fused["peak_mib"] / 1024,
               "memory_ratio": ratios["memory"], "time_ratio": ratios["wall"],
               "plain_tokens_per_s": data["tokens"] / plain["wall_s"],
               "fused_tokens_per_s": data["tokens"] / fused["wall_s"],
               "max_rel_diff": max(data["max_rel_diff"].values()), "per_output": data["max_rel_diff"]}  # fmt: skip
    expect(ratios["memory"] <= 0.1, f"fused peak memory {ratios['memory']:.3f}x the plain path's (> 0.1)")
    expect(figures["max_rel_diff"] <= 1e-5, f"fused and plain differ by {figures['max_rel_diff']:.1e} (> 1e-5)")
    return figures


def check_vllm_bf16() -> dict[str, Any]:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    name, what = model_folder()
    torch.cuda.reset_peak_memory_stats()
    sets = loop_sets(name, 2) + ["rollout.engine=vllm", "rollout.dtype=bfloat16", "model.dtype=float32",
                                 "rollout.gpu_memory_utilization=0.3", "rollout.max_model_len=1024"]
    rows = run_loop("grpo.hpt", sets, run_dir("vllm"))
    out = {"model": what, **loop_figures(rows)}
    expect(out["steps"] == 2 and not out["skipped_steps"], f"steps {out['steps']}, skipped {out['skipped_steps']}")
    return out


def check_vllm_launcher() -> dict[str, Any]:
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    name, what = model_folder()
    run = run_dir("vllm_launcher")
    sets = loop_sets(name, 2) + ds_sets(3) + ["rollout.engine=vllm", "rollout.gpu_memory_utilization=0.3",
                                              "rollout.max_model_len=1024", "rollout.tis_cap=2.0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "hpt_dsl.cli.main",
               "run", str(REPO / "recipes" / "grpo.hpt"), *(f"--set={x}" for x in sets), "-o", str(run), "--quiet",
               "--no-plots"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=os.environ["WORK"])
    sys.stderr.write(proc.stderr[-20000:])
    expect(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    engines = proc.stderr.count("Using external launcher for distributed inference")
    out = {"model": what, "steps": len(rows), "engines": engines, "tis_mismatch": [r["tis/mismatch"] for r in rows],
           "s_per_step": rows[-1]["time/step"] if rows else None}
    expect(len(rows) == 2 and engines == 1 and not any(r["skipped"] for r in rows), f"{out}")
    return out


def check_vllm_server() -> dict[str, Any]:
    import importlib.util
    import signal
    import socket
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    from hpt_dsl.models import build_tiny
    from hpt_dsl.rollout.server import server_command, wait_ready
    from hpt_dsl.rollout.vllm import RolloutEngineError

    name, what = model_folder()
    folder = str(build_tiny(Path(os.environ["WORK"]) / "tiny-server", 0)) if name == "tiny" else name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(os.environ["WORK"]) / "vllm_server.log", "w")  # noqa: SIM115 - the server's lifetime
    command = server_command(folder, port, python=sys.executable) + ["--gpu-memory-utilization", "0.3",
                                                                     "--max-model-len", "1024"]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})  # fmt: skip
    try:
        try:
            start_s = wait_ready(f"127.0.0.1:{port}", server, 150)
        except RolloutEngineError as err:
            raise CheckFailed(f"{err} (see vllm_server.log)") from None
        run = run_dir("vllm_server")
        sets = loop_sets(name, 2) + ds_sets(3) + ["rollout.engine=vllm_server", f"rollout.server=127.0.0.1:{port}",
                                                  "rollout.tis_cap=2.0"]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "hpt_dsl.cli.main", "run",
             str(REPO / "recipes" / "grpo.hpt"), *(f"--set={x}" for x in sets), "-o", str(run), "--quiet",
             "--no-plots"], capture_output=True, text=True, cwd=os.environ["WORK"],
        )  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    sys.stderr.write(proc.stderr[-20000:])
    expect(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    out = {"model": what, "server_start_s": round(start_s, 1), "steps": len(rows),
           "tis_mismatch": [r["tis/mismatch"] for r in rows], "s_per_step": rows[-1]["time/step"] if rows else None}
    expect(len(rows) == 2 and not any(r["skipped"] for r in rows), f"{out}")
    return out


def check_fused_adam() -> dict[str, Any]:
    import torch
    from deepspeed.ops.op_builder import FusedAdamBuilder

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability(0)))
    start = time.perf_counter()
    FusedAdamBuilder().load()
    built = time.perf_counter() - start
    os.environ["OPTIMIZER"] = "fused_adam"
    rows = run_loop("sft.hpt", ["train.eval_every=0", "train.steps=1", "train.save_every=0"] + ds_sets(2),
                    run_dir("fused"))
    expect(len(rows) == 1 and not rows[0]["skipped"], f"rows {rows}")
    return {"build_s": built, "grad_norm": rows[0]["grad_norm"]}


RUNNERS: dict[str, Callable[[], dict[str, Any]]] = {
    c.name: globals()[f"check_{c.name}"] for c in CHECKS
}


# ----- the command line --------------------------------------------------------------------------


def plan(names_only: bool) -> None:
    if names_only:
        print(" ".join(f"{c.name}:{c.cap_s}" for c in CHECKS))
        return
    print("gpu_smoke: checks, in order (each in its own process, capped; the run stops starting checks when "
          "its budget is spent):")
    for c in CHECKS:
        print(f"  {c.name:<20} cap {c.cap_s:>3} s  {c.guards}")
    print("gpu_smoke: paths it needs beyond a clean checkout:")
    for path, why in needed_paths():
        exists = Path(path).exists() if path.startswith("/") else any(REPO.glob(path))
        here = "present" if exists else "absent here"
        print(f"  {path:<30} {here:<12} {why}")


def run_check(name: str) -> int:
    """Run and record one check; 0 when it passed (or was skipped)."""
    start = time.perf_counter()
    try:
        figures = RUNNERS[name]()
        status = "skipped" if "skipped" in figures else "ok"
        entry: dict[str, Any] = {"status": status, **figures}
    except Exception as err:  # noqa: BLE001 - recorded with its traceback's tail
        tail = traceback.format_exc().strip().splitlines()[-12:]
        entry = {"status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[:600]}", "traceback": tail}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    record(name, entry)
    return 0 if entry["status"] != "failed" else 1


def outcome(name: str, rc: int, seconds: float, log: str) -> None:
    """Record a step that left no entry of its own: the install (``rc`` 0: ok), a check killed
    by its cap (124, 137) or crashed hard, or one not started (-1: the budget was spent)."""
    if name in load_results().get("checks", {}):
        return
    lines = Path(log).read_text(errors="replace").strip().splitlines()[-12:] if log and Path(log).is_file() else []
    status = {0: "ok", 124: "timeout", 137: "timeout", -1: "skipped"}.get(rc, "failed")
    entry: dict[str, Any] = {"status": status, "exit_code": rc, "seconds": seconds}
    if status == "skipped":
        entry["skipped"] = "no time left in the budget, or its cap is 0"
    elif status != "ok":
        entry["log_tail"] = lines
    record(name, entry)


def verdict() -> int:
    """1 when a check failed, timed out or left no entry; else 0."""
    checks = load_results().get("checks", {})
    bad = [n for n, e in checks.items() if e.get("status") not in ("ok", "skipped")]
    print(f"gpu_smoke: {len(checks) - len(bad)} of {len(checks)} passed or skipped" + (
        f"; not passed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def summary(name: str) -> str:
    entry = load_results().get("checks", {}).get(name, {"status": "missing"})
    keys = ("gpu", "hpt_dsl", "s_per_step", "generated_tokens_per_s", "peak_gpu_allocated_gib", "update_s",
            "shared_vs_plain_max_abs", "build_s", "memory_ratio", "time_ratio", "fused_tokens_per_s", "max_rel_diff",
            "skipped", "error")
    figures = []
    for k in keys:
        if k in entry:
            v = entry[k]
            figures.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    status = entry["status"].upper() if entry["status"] in ("failed", "timeout", "missing") else entry["status"]
    return f"gpu_smoke: CHECK {name}: {status} ({entry.get('seconds', 0)} s) " + " ".join(figures)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "plan":
        plan("--names" in rest)
        return 0
    if cmd == "check":
        return run_check(rest[0])
    if cmd == "outcome":
        outcome(rest[0], int(rest[1]), float(rest[2]), rest[3])
        return 0
    if cmd == "summary":
        print(summary(rest[0]))
        return 0
    if cmd == "verdict":
        return verdict()
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
