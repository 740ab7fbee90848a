#!/usr/bin/env bash
# env: ARMS (all arms, for progress/pack), WAIT_ARMS, WAIT_SECONDS, CV_SPECS ("H:0.5 L:none"; none = label targets)
set -uo pipefail
t0=$(date +%s)
source .devcache/s48/common.sh
for arm in ${WAIT_ARMS:-}; do
  left=$((WAIT_SECONDS - ($(date +%s) - t0)))
  [ $left -lt 0 ] && left=0
  python3 scripts/detached_call.py follow "$W/state-$arm" --seconds "$left" --lines 3
  [ -f "$W/state-$arm/exit" ] || python3 scripts/detached_call.py stop "$W/state-$arm" --grace 25
done
echo "waited $(($(date +%s) - t0)) s"
progress
for spec in ${CV_SPECS:-}; do
  arm=${spec%%:*} t=${spec##*:}
  thr=(--threshold "$t"); [ "$t" = none ] && thr=()  # label checkpoints take no threshold
  python3 scripts/cv_eval.py "$W/runs-$arm" "$RAW" "$W/cv-$arm-$t" --device cuda "${thr[@]}" \
    --postprocess largest 2>&1 | tail -n 30
  echo "cv $spec done $(($(date +%s) - t0)) s"
done
pack
echo "final.sh done $(($(date +%s) - t0)) s"
