# sourced by start.sh / final.sh: work dir, environment, arm definitions
W=/tmp/s48
mkdir -p "$W"
source scripts/device_env.sh && device_env "$W/triton-home" || { echo "device_env failed"; exit 1; }
RAW=.gpudata/brats18raw
COMMON=(--set val_every=2 --set optim.ema=0.999
  --set optim.ema_start=500 --set data.patches.fg_fraction=0.66)
REGIONS=(--set data.target=regions --set loss.name=bce_dice)
LABELS=(--set data.target=labels --set loss.name=ce_dice)
FOLDS=(--folds 0 1 2 3 4 --set infer.final_eval=false)
MM=(--configs configs/brats2018_mmsegrwkv.toml --set model.overrides.deep_supervision=2)
arm_args() {  # arm letter -> campaign options (without epochs/minutes/cache)
  case $1 in
    L) echo "${MM[*]} ${LABELS[*]} ${FOLDS[*]} --tag ${TAG:-ds2_e$EPOCHS}_labels" ;;
    H) echo "${MM[*]} ${REGIONS[*]} --set model.overrides.half_res_width=32 ${FOLDS[*]} --tag ${TAG:-ds2_e$EPOCHS}_hrw32" ;;
    N) echo "${MM[*]} ${REGIONS[*]} --set model.overrides.resfm=none ${FOLDS[*]} --tag ${TAG:-ds2_e$EPOCHS}_nofm" ;;
    B) echo "${MM[*]} ${REGIONS[*]} ${FOLDS[*]} --tag ${TAG:-ds2_e$EPOCHS}" ;;
    *) echo "unknown arm $1" >&2; return 1 ;;
  esac
}
progress() {
  for arm in $ARMS; do
    for m in "$W"/runs-$arm/*/metrics.csv; do
      [ -f "$m" ] && echo "$arm $(basename "$(dirname "$m")") $(wc -l <"$m") lines: $(tail -n 1 "$m" | cut -c1-160)"
    done
    [ -f "$W/state-$arm/exit" ] && echo "$arm exit $(cat "$W/state-$arm/exit")"
  done
}
pack() {  # small files of every arm's runs, CVs and logs into $OUT/small.tgz (scripts/detached_call.py's --pack)
  local folders=() arm
  for arm in $ARMS; do
    for d in "$W/runs-$arm" "$W"/cv-"$arm"-* "$W/state-$arm"; do [ -d "$d" ] && folders+=(--pack "$d"); done
  done
  python3 scripts/detached_call.py follow "$W/state-${ARMS%% *}" --seconds 0 --lines 0 --out "$OUT" "${folders[@]}" \
    --exclude '*.safetensors' --exclude state.pt --exclude '*.nii.gz'
  ls -l "$OUT"
}
