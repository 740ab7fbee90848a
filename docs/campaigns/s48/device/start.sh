#!/usr/bin/env bash
# env: ARMS, EPOCHS, MINUTES, TAG (optional), NW, FOLLOW_SECONDS
set -uo pipefail
t0=$(date +%s)
source .devcache/s48/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv
[ -d "$W/cache" ] || python3 -m rwkvseg.cli preprocess "$RAW" --out "$W/cache" | tail -n 2
echo "preprocess done $(($(date +%s) - t0)) s"
for arm in $ARMS; do
  read -r -a args <<<"$(arm_args "$arm")" || exit 2
  python3 scripts/detached_call.py start "$W/state-$arm" -- python3 scripts/campaign.py "$W/cache" "$W/runs-$arm" \
    --epochs "$EPOCHS" --minutes "$MINUTES" "${COMMON[@]}" "${args[@]}" --compile-cache "$W/cc-$arm"
done
first=1
for arm in $ARMS; do
  left=$((FOLLOW_SECONDS - ($(date +%s) - t0)))
  [ $left -lt 0 ] && left=0
  python3 scripts/detached_call.py follow "$W/state-$arm" --seconds "$left" --lines 3
done
progress
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
[ -n "${NOPACK:-}" ] || pack
echo "start.sh done $(($(date +%s) - t0)) s"
