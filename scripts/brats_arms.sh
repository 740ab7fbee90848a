#!/usr/bin/env bash
# Screening arms of MMSegRWKV on the five BraTS folds over the calls of one device lease (docs/campaigns/, sessions
# 47-48): each arm is one scripts/campaign.py run of the five folds, started detached so that it trains on between
# calls, then cross-validated with scripts/cv_eval.py and its small files returned as $OUT/small.tgz.
#
# Usage (from the repository root on the device; the wheels of monai and nibabel carried in .whl/ or $WHEELS, the
# raw 2 mm BraTS folder in $RAW, default .gpudata/brats18raw, a copy of ../shared/data/brats2018_4mod_2mm):
#   ARMS="L H" EPOCHS=17 MINUTES=14 FOLLOW_SECONDS=540 scripts/brats_arms.sh start
#       preprocess (once), start each arm's campaign detached, follow them for FOLLOW_SECONDS, report, pack
#       (NOPACK=1: no pack). TAG replaces the runs' tag stem (default ds2_e<epochs>). ALL_EPOCHS: the epochs of
#       arms A and S (default EPOCHS), e.g. the five-fold runs' schedule beside a shorter screening arm.
#       FIT=1: each run fitted to its MINUTES (--set fit_schedule=true): fewer epochs if the budget cannot hold
#       them, the poly schedule finished, where without it the budget stops a run part-way (session 53).
#       ARM_EPOCHS="B:34": the epochs of each ARM named there, before EPOCHS and ALL_EPOCHS. WORKERS:
#       each run's patch loaders (default: scripts/campaign.py's share of the cores among one arm's runs, which
#       over-books the cores when several arms run at once).
#   ARMS="L H" WAIT_ARMS="L H" WAIT_SECONDS=430 CV_SPECS="L:none H:0.5" scripts/brats_arms.sh final
#       wait for each of WAIT_ARMS until WAIT_SECONDS have passed, stop what still runs (its last finished epoch
#       stays whole), cross-validate each ARM:CUT of CV_SPECS (cut none: no --threshold, for label targets, whose
#       checkpoints refuse one) with `largest` (ARM:CUT:last: each fold's last epoch instead of its best, the rule
#       of the final models A and S, in cv-ARM-CUT-last), pack
#       EXPORT="A:mmsegrwkv-brats2018 S:mmsegrwkv_small-brats2018": also export each ARM's best checkpoint as the
#       int8 release NAME and return them as $OUT/rel.tar.part?? (parts of 15 MiB; cat them | tar x)
#       A cross-validation folder an earlier call left without its cv.json (the call ended first) is moved to
#       $WORK/cut-<folder>-<seconds> and written again; a finished one is kept and cv_eval.py refuses to overwrite it.
#       INT8_CV="B:0.5": also export each fold's best checkpoint of each ARM as int8 (the shipped precision) in
#       $WORK/int8-ARM and cross-validate those exports at CUT with `largest` (cv-ARM-CUT-int8): the int8 change of
#       the recipe on held-out cases, beside CV_SPECS's fp32 cross-validation of the same runs
#   scripts/brats_arms.sh one        start, then final, in one call (the env of both)
#   TEST_WHEELS=DIR scripts/brats_arms.sh gputest
#       the GPU-marked tests of layers, 3D training and memory formats, with pytest's wheels from DIR (default
#       .devcache/tw: pip download --no-deps --python-version 3.12 --only-binary=:all: pytest pluggy iniconfig
#       packaging pygments), TEST_TIMEOUT seconds at most (default 140)
# WORK (default /tmp/brats-arms) holds the cache, the runs, the compile caches and the detached states: a second
# call on the same warm machine finds them there.
# The arms (all on session 44's recipe: weight EMA 0.999 from step 500, 66 % foreground patches, validation every 2
# epochs, deep supervision on two decoder levels, the five folds of splits/brats2018_2mm_5fold.json):
#   B  regions (BCE + Dice), the base       L  labels (CE + Dice)
#   H  regions, half_res_width=32           N  regions, resfm=none
#   F  regions, half_res_width=32 with the heads on the 1/2 and 1/4 maps (fine_heads, DynUNet's levels)
#   M  regions, fm_channels=8 (ResFM: 8 embedding channels per modality, 32 into the stem, where the paper's 2 give 8)
#   W  regions, loss.region_weights=[1,2,1] (the tumour core's BCE and Dice weighed double)
#   R  regions, data.patches.augment_preset=strong (each transform more often, with MRI bias fields, per-modality
#      intensity shifts and inverted gamma: rwkvseg.data.patches3d), against the generalisation gap of session 54
#      (MMSegRWKV reaches DynUNet's training loss and validates 0.028 lower); session 55: a tie with B, and with
#      two loader workers per run (WORKERS=2) five runs waited 5-6 s of each 24 s epoch for patches
# and the final models of the recipe (train_all: the 13 training and 5 validation cases of the committed single split,
# all 18, none validated, the last epoch kept; their epochs chosen by the five-fold runs):
#   A  MMSegRWKV, regions                   S  MMSegRWKV-small, regions
#   G  MMSegRWKV, regions, fm_channels=8 (arm M's recipe: its final model, trained beside M's five folds so that
#      it can be released in the same lease if M wins)
#   V  MMSegRWKV, regions, loss.region_weights=[1,2,1] (arm W's recipe: its final model, beside W's five folds)
set -uo pipefail
W=${WORK:-/tmp/brats-arms}
RAW=${RAW:-.gpudata/brats18raw}
COMMON=(--set val_every=2 --set optim.ema=0.999 --set optim.ema_start=500 --set data.patches.fg_fraction=0.66)
REGIONS=(--set data.target=regions --set loss.name=bce_dice)
LABELS=(--set data.target=labels --set loss.name=ce_dice)
FOLDS=(--folds 0 1 2 3 4 --set infer.final_eval=false)
MM=(--configs configs/brats2018_mmsegrwkv.toml --set model.overrides.deep_supervision=2)
SMALL=(--configs configs/brats2018_mmsegrwkv_small.toml --set model.overrides.deep_supervision=2)
ALL=(--set train_all=true)

arm_args() {  # arm letter -> EP, its epochs, and ARGS, its campaign options (without epochs, minutes, cache)
  EP=$EPOCHS
  case $1 in A | S | G | V) EP=${ALL_EPOCHS:-$EPOCHS} ;; esac
  local spec
  for spec in ${ARM_EPOCHS:-}; do [ "${spec%%:*}" = "$1" ] && EP=${spec#*:}; done
  local tag=${TAG:-ds2_e$EP}
  case $1 in
    B) ARGS=("${MM[@]}" "${REGIONS[@]}" "${FOLDS[@]}" --tag "$tag") ;;
    L) ARGS=("${MM[@]}" "${LABELS[@]}" "${FOLDS[@]}" --tag "${tag}_labels") ;;
    H) ARGS=("${MM[@]}" "${REGIONS[@]}" --set model.overrides.half_res_width=32 "${FOLDS[@]}" --tag "${tag}_hrw32") ;;
    N) ARGS=("${MM[@]}" "${REGIONS[@]}" --set model.overrides.resfm=none "${FOLDS[@]}" --tag "${tag}_nofm") ;;
    F) ARGS=("${MM[@]}" "${REGIONS[@]}" --set model.overrides.half_res_width=32 --set model.overrides.fine_heads=true \
      "${FOLDS[@]}" --tag "${tag}_hrw32_fine") ;;
    M) ARGS=("${MM[@]}" "${REGIONS[@]}" --set model.overrides.fm_channels=8 "${FOLDS[@]}" --tag "${tag}_fm8") ;;
    W) ARGS=("${MM[@]}" "${REGIONS[@]}" --set "loss.region_weights=[1,2,1]" "${FOLDS[@]}" --tag "${tag}_tc2") ;;
    R) ARGS=("${MM[@]}" "${REGIONS[@]}" --set data.patches.augment_preset=strong "${FOLDS[@]}" --tag "${tag}_strong") ;;
    A) ARGS=("${MM[@]}" "${REGIONS[@]}" "${ALL[@]}" --tag "${tag}_all") ;;
    S) ARGS=("${SMALL[@]}" "${REGIONS[@]}" "${ALL[@]}" --tag "${tag}_all") ;;
    G) ARGS=("${MM[@]}" "${REGIONS[@]}" --set model.overrides.fm_channels=8 "${ALL[@]}" --tag "${tag}_fm8_all") ;;
    V) ARGS=("${MM[@]}" "${REGIONS[@]}" --set "loss.region_weights=[1,2,1]" "${ALL[@]}" --tag "${tag}_tc2_all") ;;
    *) echo "$0: unknown arm $1 (B, L, H, N, F, M, W, R, A, S, G or V)" >&2; return 2 ;;
  esac
}

progress() {  # each run's last history line, and the arms that ended
  local arm m
  for arm in $ARMS; do
    for m in "$W"/runs-"$arm"/*/metrics.csv; do
      [ -f "$m" ] && echo "$arm $(basename "$(dirname "$m")") $(wc -l <"$m") lines: $(tail -n 1 "$m" | cut -c1-160)"
    done
    [ -f "$W/state-$arm/exit" ] && echo "$arm exit $(cat "$W/state-$arm/exit")"
  done
}

pack() {  # the small files of every arm's runs, cross-validations and logs into $OUT/small.tgz
  local folders=() arm d
  for arm in $ARMS; do
    for d in "$W/runs-$arm" "$W"/cv-"$arm"-* "$W/state-$arm"; do [ -d "$d" ] && folders+=(--pack "$d"); done
  done
  # follow's status 3 says the first arm still runs (start packs while the arms train on): the pack is whole
  python3 scripts/detached_call.py follow "$W/state-${ARMS%% *}" --seconds 0 --lines 0 --out "$OUT" "${folders[@]}" \
    --exclude '*.safetensors' --exclude state.pt --exclude '*.nii.gz' || [ $? -eq 3 ] ||
    { echo "$0: packing failed" >&2; return 1; }
  ls -l "$OUT"
}

start() {
  local t0 arm left
  : "${EPOCHS:?set EPOCHS, e.g. 17}" "${MINUTES:?set MINUTES, the budget of each campaign}" "${FOLLOW_SECONDS:?set FOLLOW_SECONDS}"
  t0=$(date +%s)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  [ -d "$W/cache" ] || python3 -m rwkvseg.cli preprocess "$RAW" --out "$W/cache" | tail -n 2
  echo "preprocess done $(($(date +%s) - t0)) s"
  local extra=()  # WORKERS and FIT, for every run
  [ -z "${WORKERS:-}" ] || extra=(--set "data.num_workers=$WORKERS")
  [ -z "${FIT:-}" ] || extra+=(--set fit_schedule=true)
  for arm in $ARMS; do
    arm_args "$arm" || return 2
    python3 scripts/detached_call.py start "$W/state-$arm" -- python3 scripts/campaign.py "$W/cache" \
      "$W/runs-$arm" --epochs "$EP" --minutes "$MINUTES" "${COMMON[@]}" "${extra[@]}" "${ARGS[@]}" \
      --compile-cache "$W/cc-$arm"
  done
  for arm in $ARMS; do
    left=$((FOLLOW_SECONDS - ($(date +%s) - t0)))
    python3 scripts/detached_call.py follow "$W/state-$arm" --seconds "$((left < 0 ? 0 : left))" --lines 3
  done
  progress
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  [ -n "${NOPACK:-}" ] || pack || return 1
  echo "start done $(($(date +%s) - t0)) s"
}

final() {
  local t0 arm left spec cut thr
  [ -z "${WAIT_ARMS:-}" ] || : "${WAIT_SECONDS:?set WAIT_SECONDS, how long to wait for WAIT_ARMS}"
  t0=$(date +%s)
  for arm in ${WAIT_ARMS:-}; do
    left=$((WAIT_SECONDS - ($(date +%s) - t0)))
    python3 scripts/detached_call.py follow "$W/state-$arm" --seconds "$((left < 0 ? 0 : left))" --lines 3
    [ -f "$W/state-$arm/exit" ] || python3 scripts/detached_call.py stop "$W/state-$arm" --grace 25
  done
  echo "waited $(($(date +%s) - t0)) s"
  progress
  for spec in ${CV_SPECS:-}; do
    IFS=: read -r arm cut which <<<"$spec"
    thr=(--threshold "$cut")
    [ "$cut" = none ] && thr=()
    set_aside_if_cut "$W/cv-$arm-$cut${which:+-$which}"
    python3 scripts/cv_eval.py "$W/runs-$arm" "$RAW" "$W/cv-$arm-$cut${which:+-$which}" --device cuda "${thr[@]}" \
      --postprocess largest --checkpoint "${which:-best}" 2>&1 | tail -n 30
    echo "cv $spec done $(($(date +%s) - t0)) s"
  done
  int8_cv || return 1
  export_releases || return 1
  pack || return 1
  echo "final done $(($(date +%s) - t0)) s"
}

set_aside_if_cut() {  # a cross-validation folder that an earlier call's end cut short (no cv.json) moves to
  # cut-<name>-<seconds>, out of the pack, so that this call's cross-validation can write the folder afresh; a
  # finished one stays, and scripts/cv_eval.py refuses to write over it
  local out=$1 aside
  [ -d "$out" ] && [ ! -f "$out/cv.json" ] || return 0
  aside="$(dirname "$out")/cut-$(basename "$out")-$(date +%s)"
  mv "$out" "$aside" && echo "$out: cut short by an earlier call (no cv.json); moved to $aside"
}

int8_cv() {  # each ARM:CUT of INT8_CV: every fold's best checkpoint as int8 in int8-ARM, cross-validated at CUT
  local spec arm cut best n rc folds
  for spec in ${INT8_CV:-}; do
    arm=${spec%%:*} cut=${spec##*:}
    rm -rf "$W/int8-$arm" && mkdir -p "$W/int8-$arm"
    folds=()  # CHECKPOINT NAME pairs: each fold's best, named after its run (the name ends in fold<K>)
    for best in "$W/runs-$arm"/*-fold[0-9]*/best.json; do
      [ -f "$best" ] && folds+=("${best%.json}" "$(basename "$(dirname "$best")")")
    done
    n=$((${#folds[@]} / 2))
    if [ "$n" -eq 0 ]; then
      echo "$0: INT8_CV $spec: no fold run with a best checkpoint in $W/runs-$arm" >&2
      return 1
    fi
    export_int8 "$W/int8-$arm" "${folds[@]}" || return 1
    set_aside_if_cut "$W/cv-$arm-$cut-int8"
    python3 scripts/cv_eval.py "$W/runs-$arm" "$RAW" "$W/cv-$arm-$cut-int8" --device cuda --threshold "$cut" \
      --postprocess largest --checkpoints-from "$W/int8-$arm" 2>&1 | tail -n 30
    rc=$?
    echo "int8 cv $spec ($n folds) ended with status $rc $(($(date +%s) - t0)) s"
  done
}

export_releases() {  # each ARM:NAME of EXPORT: its run's best checkpoint as the int8 release NAME, in rel.tar parts
  local spec arm name best releases=()
  [ -n "${EXPORT:-}" ] || return 0
  rm -rf "$W/weights" && mkdir -p "$W/weights"
  for spec in $EXPORT; do
    arm=${spec%%:*} name=${spec#*:}
    best=("$W/runs-$arm"/*/best.json)
    if [ "${#best[@]}" -ne 1 ] || [ ! -f "${best[0]}" ]; then
      echo "$0: EXPORT $spec: no single best checkpoint in $W/runs-$arm" >&2
      return 1
    fi
    releases+=("${best[0]%.json}" "$name")
  done
  export_int8 "$W/weights" "${releases[@]}" || return 1
  tar cf - -C "$W" weights | split -b 15M - "$OUT/rel.tar.part"
}

gputest() {  # after device_env (monai and nibabel installed, src/ on PYTHONPATH): pytest's wheels beside them
  local t0 status
  t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --target /tmp/tsite "${TEST_WHEELS:-.devcache/tw}"/*.whl || return 1
  PYTHONPATH=/tmp/tsite:$PYTHONPATH:$PWD/tests timeout "${TEST_TIMEOUT:-140}" python3 -m pytest -p no:cacheprovider \
    -m gpu -q -o addopts= tests/layers tests/train/test_train3d.py tests/test_memory_format.py 2>&1 | tail -n 25
  status=$?  # pytest's (pipefail), or 124 from timeout
  echo "tests done $(($(date +%s) - t0)) s"
  return $status
}

case ${1:-} in
  start | final | one) : "${ARMS:?set ARMS, the arms to run or report, e.g. L or H N}" ;;
  gputest) ;;
  *) echo "usage: $0 start|final|one|gputest (settings in the environment: see the header)" >&2; exit 2 ;;
esac
mkdir -p "$W"
source scripts/device_env.sh && device_env "$W/triton-home" || { echo "$0: device_env failed" >&2; exit 1; }
case $1 in
  start) start ;;
  final) final ;;
  one)
    t1=$(date +%s)
    NOPACK=1 start || exit  # one return: final packs
    WAIT_SECONDS=$((WAIT_SECONDS - ($(date +%s) - t1))) final
    ;;
  gputest) gputest ;;
esac
