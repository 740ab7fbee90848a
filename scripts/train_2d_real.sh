#!/usr/bin/env bash
# Train U-RWKV, U-RWKV-s and the U-Net baseline with one recipe on Kvasir-SEG and BUSI, all six runs at once on
# one GPU. DATA holds kvasir_seg/ and busi/ (the originals, or `rwkvseg compact2d` copies at 256 x 256).
# Usage: scripts/train_2d_real.sh DATA RUNS EPOCHS_KVASIR EPOCHS_BUSI [extra --set overrides...]
set -euo pipefail
data=$1 runs=$2 epochs_kvasir=$3 epochs_busi=$4
shift 4
rwkvseg=(python3 -m rwkvseg.cli)
command -v rwkvseg >/dev/null && rwkvseg=(rwkvseg)
pids=()
for dataset in kvasir_seg busi; do
  epochs=$epochs_kvasir
  [ "$dataset" = busi ] && epochs=$epochs_busi
  for model in urwkv urwkv_s unet; do
    mkdir -p "$runs/$dataset-$model"
    "${rwkvseg[@]}" train --data "$data/$dataset" --out "$runs/$dataset-$model" --no-progress \
      --set model.name="$model" --set data.split="splits/$dataset.json" --set epochs="$epochs" \
      --set data.num_workers=2 "$@" > "$runs/$dataset-$model/train.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
