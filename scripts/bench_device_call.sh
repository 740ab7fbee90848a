#!/usr/bin/env bash
# One device call of a `rwkvseg bench models` run that may need several calls (docs/speed.md): the run's JSON and
# the compile caches live in STATE (an ignored folder such as .devcache/bench: a warm device machine keeps it between
# calls), so the same command again continues the run with --resume, measuring only the rows it lacks, and compiles
# from warm caches what an interrupted row had already compiled. The caches: Inductor's in STATE/inductor (its
# generated Triton kernels included), and Triton's own for this project's kernels (Bi-WKV, the fused norms) in
# STATE/triton-home (TRITON_HOME), which comes back gzipped when that is at most 15 MiB (uncompressed it was larger
# in both of session 28's 3D and 2D runs), so that a fresh machine need not compile them again.
#
# Usage (from the repository root; on the device, the wheels of monai and nibabel carried in .whl/ or $WHEELS):
#   scripts/bench_device_call.sh STATE OUT SECONDS NAME [rwkvseg bench models options...]
# e.g. scripts/bench_device_call.sh .devcache/bench "$OUT" 570 b3 3 --models mmsegrwkv segresnet dynunet swinunetr \
#        --sides 128 64 160 96 --modes eager compiled --phases infer train --compile-mode reduce-overhead
# WARM (optional, environment): options that pick the run's later compiled rows, e.g. WARM="--models unet --sides
# 1024". A second bench starts beside the run with the run's options, then WARM, then `--modes compiled --repeats 1`,
# into the same compile caches (its rows in STATE/NAME-warm-HASH.json, one file per WARM, which the same WARM in the
# next call resumes; its log back as NAME-warm.log), so that the run finds those graphs compiled when it reaches
# them: several compilations at once on the device's CPU cores, where one run compiles one graph at a time. Its
# single timed calls share the GPU with the run's timed calls at moments
# (session 27: SwinUNETR's 160^3 training step timed 293.00 ms in the run and 292.96 ms in its warmer).
# SECONDS: the bench's share of the call: then it gets SIGINT, and is killed 30 s later if a compilation holds it
# (session 27, on an H100 host: once in three calls); either way each row is in the JSON as soon as it is measured.
# Back in OUT: NAME.json (the rows so far), NAME.log (the bench's output), NAME-warm.log (with WARM),
# NAME-kernels.tgz (STATE/triton-home, when that is at most 15 MiB) and, once the run is complete, NAME.png (the
# cost-growth figure; an interrupted run draws none: the next call's --resume finishes it and draws it, and
# `rwkvseg bench show NAME.json --png FIG` draws the rows so far on any machine). To continue on a fresh machine
# of the same kind (another session), put them back and carry STATE:
#   mkdir -p STATE && cp NAME.json STATE/ && tar xzf NAME-kernels.tgz -C STATE   (carry [".devcache/bench"])
set -uo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 STATE OUT SECONDS NAME [rwkvseg bench models options...]" >&2
  exit 2
fi
state=$1 out=$2 seconds=$3 name=$4
shift 4
[ -d "$out" ] || { echo "$0: $out is not a folder" >&2; exit 2; }
mkdir -p "$state/inductor" || exit 2
source "$(dirname "$0")/device_env.sh" && device_env "$state/triton-home" || exit 1  # wheels, PYTHONPATH, TRITON_HOME
TORCHINDUCTOR_CACHE_DIR=$(realpath "$state/inductor")
export TORCHINDUCTOR_CACHE_DIR
json=$state/$name.json
resume=()
[ -f "$json" ] && resume=(--resume)
warm_pid=
if [ -n "${WARM:-}" ]; then
  read -ra warm <<< "$WARM"
  warm_json=$state/$name-warm-$(printf %s "${warm[*]}" | md5sum | cut -c1-8).json  # resumed by the same options
  warm_resume=()
  [ -f "$warm_json" ] && warm_resume=(--resume)
  timeout -s INT -k 30 "$seconds" python3 -m rwkvseg.cli bench models "$@" "${warm[@]}" --modes compiled --repeats 1 \
    --json "$warm_json" "${warm_resume[@]}" >> "$state/$name-warm.log" 2>&1 &
  warm_pid=$!
fi
timeout -s INT -k 30 "$seconds" python3 -m rwkvseg.cli bench models "$@" --json "$json" --png "$state/$name.png" \
  "${resume[@]}" 2>&1 | tee -a "$state/$name.log"
status=${PIPESTATUS[0]}
echo "bench exit $status"
if [ -n "$warm_pid" ]; then
  wait "$warm_pid"
  echo "warmer exit $?"
fi
for file in "$json" "$state/$name.png" "$state/$name.log" "$state/$name-warm.log"; do
  [ -f "$file" ] && cp "$file" "$out/"
done
tar czf "$out/$name-kernels.tgz" -C "$state" triton-home
if [ "$(stat -c %s "$out/$name-kernels.tgz")" -gt $((15 * 1048576)) ]; then
  echo "$state/triton-home is larger than 15 MiB gzipped: not returned"
  rm -f "$out/$name-kernels.tgz"
fi
exit "$status"
