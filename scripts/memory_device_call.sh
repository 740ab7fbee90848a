#!/usr/bin/env bash
# One device call that gathers the evidence for the 3D inference-memory target (docs/targets.md, "Next on the
# GPU"): for MMSegRWKV (the bench's settings: fused norms, GEMM convolutions) and the two CNN baselines at
# 1 x 4 x 128^3, channels-last, bf16, compiled under CUDA graphs as the bench runs them:
#   1. scripts/memory_trace.py: what the CUDA allocator holds at the steady calls' peak, block by block;
#   2. rwkvseg bench models ... --bf16-weights: the inference rows with bf16-held weights, then the same rows
#      without it, in one run each (every model's rows from one process);
#   3. scripts/memory_plan.py --first-graph-only: Inductor's own plan of the same graph on CUDA.
# A failed or stopped step does not stop the next. Nothing needs a cache from an earlier call.
#
# Usage (from the repository root; on the device, the wheels of monai and nibabel carried in .whl/ or $WHEELS):
#   scripts/memory_device_call.sh OUT [MODELS...]      (default MODELS: mmsegrwkv segresnet dynunet)
# In that order: the traces are the evidence missing so far. A step gets STEP_SECONDS (default 150; a bench run
# twice that), so the whole may take longer than one call's 600 s: give the call all of it, and what is done by
# then comes back.
# Back in OUT (at most 8 files come back from a call): trace-MODEL.txt for each model (the JSON holds the same
# numbers), bench-bf16w.json and bench-f32w.json, plans.txt (the plans' texts) and steps.log (every step's output).
set -uo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: $0 OUT [MODELS...] (OUT: an existing folder)" >&2
  exit 2
fi
out=$1
shift
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mmsegrwkv segresnet dynunet)
# shellcheck source=scripts/device_env.sh
. scripts/device_env.sh
device_env /tmp/memory-call-triton || { echo "$0: device_env failed" >&2; exit 1; }
seconds=${STEP_SECONDS:-150}
work=$(mktemp -d)
log="$out/steps.log"
: >"$log"

mmseg_settings=(fused_norm=true gemm_convs=true)  # the bench's settings of MMSegRWKV, the only model with any
overrides=()  # for bench models: --override mmsegrwkv:KEY=VALUE
for kv in "${mmseg_settings[@]}"; do overrides+=(--override "mmsegrwkv:$kv"); done
settings() {  # for the scripts: --set KEY=VALUE, for MMSegRWKV
  if [ "$1" = mmsegrwkv ]; then printf -- '--set %s ' "${mmseg_settings[@]}"; fi
}

step() {  # step NAME SECONDS COMMAND...: run under that time limit, its output into steps.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" >>"$log"
  timeout -s INT -k 30 "$limit" "$@" >>"$log" 2>&1
  echo "=== $name: exit $?" >>"$log"
}

common=(--dims 3 --side 128 --memory-format channels_last --device cuda)
for model in "${models[@]}"; do
  # shellcheck disable=SC2046  # settings() gives separate words on purpose
  step "trace $model" "$seconds" python3 scripts/memory_trace.py "$model" "${common[@]}" $(settings "$model") \
    --compile-mode reduce-overhead --out "$work/trace-$model"
  [ -f "$work/trace-$model/trace.txt" ] && cp "$work/trace-$model/trace.txt" "$out/trace-$model.txt"
done
for weights in bf16w f32w; do
  flag=()
  [ "$weights" = bf16w ] && flag=(--bf16-weights)
  step "bench $weights" $((2 * seconds)) python3 -m rwkvseg.cli bench models 3 --models "${models[@]}" --sides 128 \
    --modes compiled --phases infer --memory-format channels_last --compile-mode reduce-overhead "${overrides[@]}" \
    "${flag[@]}" --json "$out/bench-$weights.json"
done
for model in "${models[@]}"; do
  # shellcheck disable=SC2046
  step "plan $model" "$seconds" python3 scripts/memory_plan.py "$model" "${common[@]}" $(settings "$model") \
    --first-graph-only --out "$work/plan-$model"
  [ -f "$work/plan-$model/plan.txt" ] && cat "$work/plan-$model/plan.txt" >>"$out/plans.txt"
done
rm -rf "$work"
