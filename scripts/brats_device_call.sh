#!/usr/bin/env bash
# One device call of the BraTS campaign (docs/mmsegrwkv.md): train the four configs (or VARIANTS) side by side,
# then evaluate each run's fp32 best checkpoint on the validation cases and export the MMSegRWKV releases as int8,
# and put what must come back into OUT in parts of at most 15 MiB (the device tool returns 8 files of 16 MiB at most).
#
# Usage (from the repository root; on the device, the wheels of monai and nibabel carried in .whl/ or $WHEELS):
#   scripts/brats_device_call.sh CACHE VAL RUNS OUT SECONDS [campaign.py options...]
# CACHE: `rwkvseg preprocess` of the dataset; VAL: a folder with the split's validation case folders (their original
# files, as `rwkvseg predict` and `rwkvseg evaluate` read them); RUNS: the campaign folder (kept on a warm machine,
# so a second call continues it); SECONDS: the whole call's budget; the campaign gets it less FINAL_SECONDS (default
# 240: on an H100 machine each `rwkvseg predict` of 5 cases took 23-34 s, so four evaluations and two exports
# need about 150 s; 0: training only, nothing evaluated or exported; SECONDS at most FINAL_SECONDS: no training,
# only the evaluations and exports of the runs an earlier call left in RUNS). The options go to scripts/campaign.py,
# e.g.
#   --epochs 36 --set val_every=2 --set data.target=regions --set loss.name=bce_dice
# (the campaign's --configs, --minutes and --compile-cache are set here: --minutes is the training share less 15 s).
# VARIANTS (default "mmsegrwkv mmsegrwkv_small segresnet dynunet"): the configs configs/brats2018_<variant>.toml to
# train, evaluate and export, e.g. VARIANTS="mmsegrwkv dynunet" gives two runs the GPU the four would share.
# Back in OUT: campaign.json, and rel.tar.part?? (cat them | tar x): evals/eval-<variant>/ (`rwkvseg evaluate` of
# each best checkpoint, no TTA, --compile off), weights/<release>.safetensors + .json (int8, `export_release`),
# runs.tar (each run's small files: metrics, best.json, config, split, summary, final_val, logs, curves); and, when
# they fit beside those, cc.tar.part?? (RUNS/cc, the compile caches and Triton's cache of this project's kernels in
# RUNS/cc/triton-home: carried in as RUNS/cc, a fresh machine with the same torch and GPU skips most of its
# compilation, which took 172-183 s of a 430 s call for MMSegRWKV). RESERVE_FILES and RESERVE_MIB (default 0): room
# kept in OUT for what the caller adds after this script (session 34 added three 2D checkpoints after it, and the
# caches it had returned pushed a weights part out of the return); the caches come back only beside that room.
# scripts/release_3d.py writes the cards from these on any machine (see its usage).
set -uo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 CACHE VAL RUNS OUT SECONDS [campaign.py options...]" >&2
  exit 2
fi
cache=$1 val=$2 runs=$3 out=$4 seconds=$5
shift 5
final=${FINAL_SECONDS:-240}
read -r -a variants <<<"${VARIANTS:-mmsegrwkv mmsegrwkv_small segresnet dynunet}"
for variant in "${variants[@]}"; do
  [ -f "configs/brats2018_$variant.toml" ] || { echo "$0: VARIANTS: no configs/brats2018_$variant.toml" >&2; exit 2; }
done
[ "${#variants[@]}" -gt 0 ] || { echo "$0: VARIANTS is empty; name at least one variant" >&2; exit 2; }
for name in RESERVE_FILES RESERVE_MIB; do
  [[ ${!name:-0} =~ ^[0-9]+$ ]] || { echo "$0: $name=${!name}: give a whole number (default 0)" >&2; exit 2; }
done
configs=()
for variant in "${variants[@]}"; do configs+=("configs/brats2018_$variant.toml"); done
for path in "$cache" "$val"; do
  [ -d "$path" ] || { echo "$0: $path is not a folder" >&2; exit 2; }
done
# the wheels, PYTHONPATH, and Triton's cache of this project's kernels beside the compile caches, so it travels
# with them (scripts/device_env.sh)
source "$(dirname "$0")/device_env.sh" && device_env "$runs/cc/triton-home" || exit 1
rwkvseg=(python3 -m rwkvseg.cli)
# the device tool's return limits, kept once in scripts/detached_call.py: files, MiB in all; parts of 15 MiB
read -r max_files max_mib < <(python3 -c "import sys; sys.path.insert(0, sys.argv[1])
from detached_call import MAX_BYTES, MAX_FILES, MiB
print(MAX_FILES, MAX_BYTES // MiB)" "$(dirname "$0")") || { echo "$0: cannot read scripts/detached_call.py" >&2; exit 1; }
start=$(date +%s)
train=$((seconds - final))
minutes=$(python3 -c "print(round(max($train - 15, 0) / 60, 2))")
if [ "$train" -gt 15 ]; then
  timeout -s INT -k 30 "$train" python3 scripts/campaign.py "$cache" "$runs" \
    --configs "${configs[@]}" \
    --minutes "$minutes" --compile-cache "$runs/cc" "$@"
  echo "campaign exit $? after $(($(date +%s) - start)) s"
fi
cp "$runs/campaign.json" "$out/" 2>/dev/null
[ "$final" -gt 0 ] || exit 0
pack=$(mktemp -d)
mkdir -p "$pack/evals" "$pack/weights"
for variant in "${variants[@]}"; do
  best=$runs/brats2018-$variant/best.safetensors
  [ -f "$best" ] || { echo "no $best: not evaluated"; continue; }
  "${rwkvseg[@]}" predict "$best" "$val" --out "$pack/pred-$variant" --mirror-axes '' --compile off >/dev/null \
    && "${rwkvseg[@]}" evaluate "$pack/pred-$variant" "$val" --out "$pack/evals/eval-$variant" | tail -n 4
  rm -rf "$pack/pred-$variant"
done
releases=()
for variant in "${variants[@]}"; do
  case $variant in mmsegrwkv | mmsegrwkv_small) ;; *) continue ;; esac  # the two released architectures
  [ -f "$runs/brats2018-$variant/best.json" ] || continue
  releases+=("$runs/brats2018-$variant/best" "$variant-brats2018")
done
[ "${#releases[@]}" -eq 0 ] || export_int8 "$pack/weights" "${releases[@]}"
(cd "$runs" && tar cf "$pack/runs.tar" --ignore-failed-read campaign.json ./*/metrics.csv ./*/best.json \
  ./*/config.json ./*/split.json ./*/summary.json ./*/final_val.json logs ./*.curves.png 2>/dev/null)
(cd "$pack" && tar cf - evals weights runs.tar | split -b 15M - "$out/rel.tar.part")
rm -rf "$pack"
# the compile caches come back when they fit beside the rest (max_files files and max_mib MiB in all)
if [ -d "$runs/cc" ]; then
  tar cf /tmp/cc.tar -C "$runs" cc
  used=$(du -cb "$out"/* | tail -n 1 | cut -f1)
  files=$(ls "$out" | wc -l)
  size=$(stat -c %s /tmp/cc.tar)
  parts=$(((size + 15 * 1048576 - 1) / (15 * 1048576)))
  room=$(((max_mib - ${RESERVE_MIB:-0}) * 1048576)) slots=$((max_files - ${RESERVE_FILES:-0}))
  if [ $((used + size)) -le "$room" ] && [ $((files + parts)) -le "$slots" ]; then
    split -b 15M /tmp/cc.tar "$out/cc.tar.part"
  else
    echo "compile caches ($size bytes) left out: they do not fit beside the rest and the reserve"
  fi
  rm -f /tmp/cc.tar
fi
ls -l "$out"
echo "done after $(($(date +%s) - start)) s"
