#!/usr/bin/env bash
# GPU smoke test: the CUDA paths of hpt-dsl in one short run on a machine with one CUDA GPU
# and no network, from the installed package (never the checkout).
#
#   bash bench/gpu_smoke.sh --dry-run        # any machine, no GPU: the checks and the paths they need
#   OUT=/some/dir bash bench/gpu_smoke.sh    # the run: results and logs under OUT
#   bash bench/gpu_smoke.sh --probe          # any machine: install, then only the import check
#
# 1. Installs hpt-dsl with `pip install --target $WORK/site` (and, from the wheels carried in
#    .whl/, any Python package this machine lacks); every check runs from $WORK with that
#    folder first on PYTHONPATH, so `import hpt_dsl` is the installed copy.
# 2. Runs the checks of bench/gpu_smoke.py in order, each in its own process under its time
#    cap, and starts no new one once BUDGET_S (default 450 s; with the install, under 8
#    minutes) is spent. One summary line per check:
#    `gpu_smoke: CHECK <name>: ok|FAILED|TIMEOUT|skipped (<s> s) <figures>`.
# 3. Each check writes its entry into the results JSON as it ends (a crash or a timeout later
#    keeps what finished): $OUT/gpu_smoke.json and $OUT/logs/<check>.log when OUT is set, else
#    bench/results/gpu_smoke.json and $WORK/logs/.
#
# Settings (environment): OUT, WORK (default /tmp/hpt-gpu-smoke), BUDGET_S (450), STEPS (3,
# steps of the ZeRO-2 run), OPTIMIZER (torch_adam: torch's AdamW through DeepSpeed; fused_adam),
# FUSED_ADAM_S (90: cap of the fused-AdamW build check; 0 skips it), CHECKS (names to run;
# default all). Exits 1 when a check failed or timed out.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --probe) MODE=probe ;;
  -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
  *) echo "gpu_smoke: unknown argument '$1'; use --dry-run, --probe or nothing (see --help)" >&2; exit 2 ;;
esac

WORK=${WORK:-/tmp/hpt-gpu-smoke}
SITE=$WORK/site
if [ -n "${OUT:-}" ]; then RESULTS_DIR=$OUT; LOGS=$OUT/logs; else RESULTS_DIR=$REPO/bench/results; LOGS=$WORK/logs; fi
RESULTS=$RESULTS_DIR/gpu_smoke.json
BUDGET_S=${BUDGET_S:-450}
FUSED_ADAM_S=${FUSED_ADAM_S:-90}
CHECKS=${CHECKS:-all}
export WORK STEPS=${STEPS:-3} OPTIMIZER=${OPTIMIZER:-torch_adam} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
SMOKE=(python3 "$REPO/bench/gpu_smoke.py")  # stdlib only until a check imports the installed package

missing_packages() {  # Python packages the checks need that this machine lacks
  (cd / && python3 - <<'EOF'
import importlib.util
mods = ["torch", "transformers", "tokenizers", "safetensors", "deepspeed", "lark", "pydantic", "hjson", "typer",
        "rich", "matplotlib", "einops", "msgpack", "psutil", "cpuinfo", "ninja", "accelerate"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
  )
}

if [ "$MODE" = dry ]; then
  echo "gpu_smoke: dry run (nothing is installed or run); results -> $RESULTS, logs -> $LOGS, budget ${BUDGET_S} s"
  "${SMOKE[@]}" plan
  missing=$(missing_packages)
  echo "gpu_smoke: Python packages missing here: ${missing:-none}${missing:+ (installed from .whl/*.whl)}"
  [ "$FUSED_ADAM_S" = 0 ] && echo "gpu_smoke: fused_adam skipped (FUSED_ADAM_S=0)"
  (cd / && python3 -c "import torch; print('gpu_smoke: CUDA here:', torch.cuda.is_available())" 2>/dev/null) \
    || echo "gpu_smoke: CUDA here: torch not importable"
  exit 0
fi

mkdir -p "$WORK" "$LOGS" "$RESULTS_DIR"
export SMOKE_RESULTS=$RESULTS SMOKE_SITE=$SITE
start=$(date +%s)
python3 - "$RESULTS" "$MODE" "$BUDGET_S" "$STEPS" "$OPTIMIZER" <<'EOF'
import json, sys, time
path, mode, budget, steps, optimizer = sys.argv[1:]
meta = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "mode": mode, "budget_s": int(budget),
        "steps": int(steps), "optimizer": optimizer, "checks": {}}
open(path, "w").write(json.dumps(meta, indent=1))
EOF

# ---- 1. install -------------------------------------------------------------------------------
t0=$(date +%s)
{
  missing=$(missing_packages)
  if [ -n "$missing" ]; then
    echo "missing: $missing"
    ls "$REPO"/.whl/*.whl >/dev/null 2>&1 || { echo "no wheels in $REPO/.whl/ for: $missing"; exit 1; }
    python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$REPO"/.whl/*.whl || exit 1
  fi
  python3 -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    "$REPO" || exit 1
} >"$LOGS/install.log" 2>&1
rc=$?
"${SMOKE[@]}" outcome install "$rc" "$(( $(date +%s) - t0 ))" "$LOGS/install.log"
"${SMOKE[@]}" summary install
[ "$rc" = 0 ] || { tail -5 "$LOGS/install.log" >&2; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1  # the installed copy first; no script dir

# ---- 2. the checks ----------------------------------------------------------------------------
if [ "$MODE" = probe ]; then
  names="env:60"
  export SMOKE_PROBE=1
else
  names=$("${SMOKE[@]}" plan --names)
fi
for item in $names; do
  name=${item%%:*}
  cap=${item##*:}
  if [ "$CHECKS" != all ] && [[ " $CHECKS " != *" $name "* ]]; then continue; fi
  if [ "$name" = fused_adam ]; then cap=$FUSED_ADAM_S; fi
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if [ "$cap" -le 0 ] || [ "$left" -lt 20 ]; then
    "${SMOKE[@]}" outcome "$name" -1 0 ""
    "${SMOKE[@]}" summary "$name"
    continue
  fi
  limit=$(( cap < left ? cap : left ))
  t0=$(date +%s)
  (cd "$WORK" && timeout -k 10 "$limit" python3 "$REPO/bench/gpu_smoke.py" check "$name") >"$LOGS/$name.log" 2>&1
  rc=$?
  "${SMOKE[@]}" outcome "$name" "$rc" "$(( $(date +%s) - t0 ))" "$LOGS/$name.log"
  "${SMOKE[@]}" summary "$name"
  if [ "$name" = env ] && [ "$rc" != 0 ]; then
    echo "gpu_smoke: the environment check failed (see $LOGS/env.log); nothing else can run" >&2
    break
  fi
done
echo "gpu_smoke: results in $RESULTS, logs in $LOGS ($(( $(date +%s) - start )) s)"
"${SMOKE[@]}" verdict
