#!/usr/bin/env bash
# GPU smoke test of the DeepSpeed learner, on a machine with one CUDA GPU and no network.
#
#   bash bench/gpu_smoke.sh                    # from anywhere; about 3-5 minutes
#   STEPS=6 STAGE=3 MEMORY=0 bash bench/gpu_smoke.sh
#
# 1. Fails at once when no CUDA GPU is visible.
# 2. Installs what is missing (deepspeed, pydantic, lark, ...) from the wheels carried in
#    .whl/ (not in git; the README section on DeepSpeed says how to fill it), and hpt-dsl itself, into a
#    private folder put first on PYTHONPATH.
# 3. Builds DeepSpeed's fused AdamW for this GPU (a JIT compile, about a minute); if that
#    fails, the run uses torch's AdamW through DeepSpeed instead (and says so).
# 4. The model: the smollm2-135m alias when its weights are installed, else SmolLM2-135M's
#    architecture and tokenizer carried in .whl/smollm2-135m with random weights (the
#    same size and speed), else the built-in tiny model.
# 5. Runs STEPS steps of recipes/hpt.hpt through the real training loop with
#    learner.engine=deepspeed, ZeRO STAGE, bf16 (checkpoint at the end), resumes it for one
#    more step, and loads the final Hugging Face checkpoint back.
# 6. MEMORY=1: one update of a 1.5B model (Qwen2.5-1.5B's architecture, random weights) on
#    one 8k-token response per micro-batch, ZeRO-2 and ZeRO-3, bf16: its peak GPU memory.
#
# Prints generated tokens/s, trained tokens/s, seconds per step and peak GPU memory, and
# writes them to bench/results/gpu_smoke.json. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-4}
STAGE=${STAGE:-2}
MEMORY=${MEMORY:-1}
WORK=${WORK:-/tmp/hpt-gpu-smoke}
SITE=$WORK/site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" bench/results
rm -rf "$WORK/run"

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_smoke: no CUDA GPU visible; this script needs one" >&2; exit 1; }
python3 -c "import torch; print('gpu_smoke: torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"

# ---- 2. packages -------------------------------------------------------------------------
missing=$(python3 - <<'EOF'
import importlib.util
mods = ["deepspeed", "lark", "pydantic", "hjson", "typer", "rich", "safetensors", "transformers",
        "tokenizers", "matplotlib", "einops", "msgpack", "psutil", "cpuinfo", "ninja"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_smoke: installing from .whl/: $missing"
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_smoke: missing $missing and no wheels in .whl/" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . \
  >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; echo "gpu_smoke: installing hpt-dsl failed" >&2; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import deepspeed, hpt_dsl, lark, pydantic; print('gpu_smoke: deepspeed', deepspeed.__version__)"

# ---- 3. fused AdamW ----------------------------------------------------------------------
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST
fi
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
OVERRIDE=""
start=$(date +%s)
if timeout 400 python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
     >"$WORK/fused_adam.log" 2>&1; then
  echo "gpu_smoke: DeepSpeed fused AdamW built in $(( $(date +%s) - start )) s"
  OPTIMIZER=fused_adam
else
  tail -5 "$WORK/fused_adam.log" >&2
  echo "gpu_smoke: WARNING: DeepSpeed's fused AdamW did not build; using torch AdamW through DeepSpeed" >&2
  OVERRIDE=$WORK/torch_adam.json
  echo '{"optimizer": {"params": {"torch_adam": true}}}' >"$OVERRIDE"
  OPTIMIZER=torch_adam
fi

# ---- 4-6. the runs -----------------------------------------------------------------------
python3 - "$WORK" "$STEPS" "$STAGE" "$MEMORY" "$OPTIMIZER" "$OVERRIDE" <<'EOF'
import json, statistics, sys, time
from pathlib import Path

import torch

work, steps, stage, memory, optimizer, override = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4] == "1", sys.argv[5], sys.argv[6]
from hpt_dsl.lang import load_recipe
from hpt_dsl.learner import deepspeed as ds_learner
from hpt_dsl.train import train

GiB = 2**30
results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "optimizer": optimizer,
           "zero_stage": stage, "steps": steps}


def model_folder():
    """The smollm2-135m alias, else its architecture with random weights, else 'tiny'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        from hpt_dsl import hub
        return str(hub.resolve("smollm2-135m")), "smollm2-135m"
    except Exception as err:
        print(f"gpu_smoke: smollm2-135m alias unavailable ({str(err).splitlines()[0][:80]})")
    carried = Path(".whl/smollm2-135m")
    if (carried / "config.json").is_file():
        target = work / "smollm2-135m-random"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(carried))
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(carried).save_pretrained(target)
        return str(target), "SmolLM2-135M architecture, random weights"
    return "tiny", "built-in tiny model"


name, what = model_folder()
results["model"] = what
print(f"gpu_smoke: model {what}")

counted = []
update = ds_learner.DeepSpeedLearner.update


def timed_update(self, *args, **kwargs):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = update(self, *args, **kwargs)
    torch.cuda.synchronize()
    counted.append((out.tokens, time.perf_counter() - t))
    return out


ds_learner.DeepSpeedLearner.update = timed_update
sets = ["learner.engine=deepspeed", f"learner.zero_stage={stage}", "learner.precision=bf16", f"model.name={name}",
        "train.eval_every=0", "data.max_test=32", "rollout.max_new_tokens=256", "train.micro_batch=16"]
if override:
    sets.append(f"learner.deepspeed_config={override}")
run = work / "run"
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
train(load_recipe(Path("recipes/hpt.hpt"), overrides=sets + [f"train.steps={steps}", f"train.save_every={steps}"]),
      run, quiet=True)
wall = time.perf_counter() - t0
rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
later = rows[1:] or rows
results.update({
    "wall_s": wall,
    "s_per_step": statistics.median(r["time/step"] for r in later),
    "generated_tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
    "trained_tokens_per_s": sum(n for n, _ in counted[1:] or counted) / sum(t for _, t in counted[1:] or counted),
    "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
    "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
    "skipped_steps": sum(bool(r["skipped"]) for r in rows),
})
print(f"gpu_smoke: {steps} steps of recipes/hpt.hpt, ZeRO-{stage} bf16, {optimizer}: {wall:.0f} s, "
      f"{results['s_per_step']:.2f} s/step, generated {results['generated_tokens_per_s']:.0f} tok/s, "
      f"trained {results['trained_tokens_per_s']:.0f} tok/s, peak GPU memory "
      f"{results['peak_gpu_allocated_gib']:.2f} GiB allocated / {results['peak_gpu_reserved_gib']:.2f} GiB reserved")

# resume from the DeepSpeed checkpoint for one more step, then load the final model back
train(load_recipe(Path("recipes/hpt.hpt"), overrides=sets + [f"train.steps={steps + 1}", "train.save_every=0"]),
      run, resume=True, quiet=True)
resumed = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
assert [r["step"] for r in resumed] == list(range(1, steps + 2)), [r["step"] for r in resumed]
from transformers import AutoModelForCausalLM
final = AutoModelForCausalLM.from_pretrained(run / "final-model")
results["resumed_to_step"] = resumed[-1]["step"]
results["final_model_parameters"] = sum(p.numel() for p in final.parameters())
print(f"gpu_smoke: resumed to step {resumed[-1]['step']}; final model loads "
      f"({results['final_model_parameters'] / 1e6:.0f}M parameters)")
del final


def memory_check(stage: int) -> dict:
    """One update of a 1.5B model on 8k-token responses, one per micro-batch."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hpt_dsl.batch import TrainBatch
    from hpt_dsl.estimator import compile_recipe
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=16384,
                         tie_word_embeddings=True)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    r = load_recipe(Path("recipes/hpt.hpt"), overrides=[
        "learner.engine=deepspeed", f"learner.zero_stage={stage}", "learner.precision=bf16",
        "train.micro_batch=1", "train.questions=2", "rollout.n=2"] + ([f"learner.deepspeed_config={override}"]
                                                                      if override else []))
    learner = DeepSpeedLearner(r, model, tokenizer=None)
    P, T, B = 256, 8192, 2
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(prompt_ids=torch.randint(0, 150000, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
                       response_ids=torch.randint(0, 150000, (B, T), generator=g), response_mask=torch.ones(B, T),
                       group_ids=torch.arange(B), is_demo=torch.ones(B, dtype=torch.bool), rewards=torch.ones(B))
    program = compile_recipe(r)
    prep = program.prepare(response_mask=batch.response_mask, rewards=batch.rewards, group_ids=batch.group_ids,
                           is_demo=batch.is_demo, old_is_current=True)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = learner.update(batch, program, prep)
    torch.cuda.synchronize()
    row = {"zero_stage": stage, "parameters_b": n_params / 1e9, "rows": B, "tokens_per_row": P + T,
           "update_s": time.perf_counter() - t, "skipped": out.skipped,
           "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
           "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    learner.close()
    del learner, model
    torch.cuda.empty_cache()
    print(f"gpu_smoke: 1.5B model ({row['parameters_b']:.2f}B), ZeRO-{stage} bf16, {B} rows x {P}+{T} tokens, "
          f"micro-batch 1: update {row['update_s']:.1f} s, peak GPU memory {row['peak_gpu_allocated_gib']:.1f} GiB "
          f"allocated / {row['peak_gpu_reserved_gib']:.1f} GiB reserved; fits 80 GB: "
          f"{'yes' if row['peak_gpu_reserved_gib'] < 80 * 1e9 / GiB else 'NO'}")
    return row


if memory:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    results["memory_1_5b"] = []
    for s in (2, 3):
        try:
            results["memory_1_5b"].append(memory_check(s))
        except Exception as err:  # report, keep the other figures, fail at the end
            print(f"gpu_smoke: MEMORY CHECK FAILED at ZeRO-{s}: {type(err).__name__}: {err}", file=sys.stderr)
            results["memory_1_5b"].append({"zero_stage": s, "error": f"{type(err).__name__}: {err}"})
Path("bench/results/gpu_smoke.json").write_text(json.dumps(results, indent=1))
print("gpu_smoke: wrote bench/results/gpu_smoke.json")
sys.exit(1 if any("error" in r for r in results.get("memory_1_5b", [])) else 0)
EOF
