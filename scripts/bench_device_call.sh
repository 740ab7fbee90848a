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
# WARM (optional, environment): option sets, separated by ";", that pick the run's compiled rows to compile ahead,
# e.g. WARM="--models unet --sides 1024; --sides 512". Each set starts a bench of its own (the run's options, then
# the set's, then `--modes compiled --repeats 1`, its rows in STATE/NAME-warm-HASH.json, one file per set, which
# the same set in the next call resumes; their output in NAME-warm.log), all at once into the same compile caches,
# several compilations on the device's CPU cores where one run compiles one graph at a time. The run starts when
# they have ended (after at most WARM_SECONDS, default half of SECONDS; the run gets the rest) and finds those
# graphs compiled. The warmers no longer run beside the run: their compilations (Triton's autotuning included)
# shared the GPU with the run's timed calls. In session 28's 3D run MMSegRWKV's 96^3 training step timed 37.67 ms
# (min 35.14) beside two warmers and 28.99 ms alone on the same kind of H100 (session 29); in session 29's 2D run
# U-Net's compiled 512^2 training step timed 89.67 ms (min 77.47) beside two warmers, its eager step 67.3 ms.
# SECONDS: the benches' share of the call, warmers and run together: then the run gets SIGINT, and is killed 30 s
# later if a compilation holds it (session 27, on an H100 host: once in three calls); either way each row is in the
# JSON as soon as it is measured.
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
run_seconds=$seconds
if [ -n "${WARM:-}" ]; then
  warm_seconds=${WARM_SECONDS:-$((seconds / 2))}
  started=$SECONDS
  warm_pids=()
  IFS=';' read -ra warm_sets <<< "$WARM"
  for options in "${warm_sets[@]}"; do
    read -ra warm <<< "$options"
    [ ${#warm[@]} -gt 0 ] || continue
    warm_json=$state/$name-warm-$(printf %s "${warm[*]}" | md5sum | cut -c1-8).json  # resumed by the same options
    warm_resume=()
    [ -f "$warm_json" ] && warm_resume=(--resume)
    timeout -s INT -k 30 "$warm_seconds" python3 -m rwkvseg.cli bench models "$@" "${warm[@]}" --modes compiled \
      --repeats 1 --json "$warm_json" "${warm_resume[@]}" >> "$state/$name-warm.log" 2>&1 &
    warm_pids+=("$!")
  done
  for pid in "${warm_pids[@]}"; do
    wait "$pid"
    echo "warmer exit $?"
  done
  run_seconds=$((seconds - (SECONDS - started)))
  if [ "$run_seconds" -lt 30 ]; then
    echo "the warmers took $((SECONDS - started)) of $seconds s: no time left for the run (lower WARM_SECONDS)"
    run_seconds=30
  fi
fi
timeout -s INT -k 30 "$run_seconds" python3 -m rwkvseg.cli bench models "$@" --json "$json" --png "$state/$name.png" \
  "${resume[@]}" 2>&1 | tee -a "$state/$name.log"
status=${PIPESTATUS[0]}
echo "bench exit $status"
for file in "$json" "$state/$name.png" "$state/$name.log" "$state/$name-warm.log"; do
  [ -f "$file" ] && cp "$file" "$out/"
done
tar czf "$out/$name-kernels.tgz" -C "$state" triton-home
if [ "$(stat -c %s "$out/$name-kernels.tgz")" -gt $((15 * 1048576)) ]; then
  echo "$state/triton-home is larger than 15 MiB gzipped: not returned"
  rm -f "$out/$name-kernels.tgz"
fi
exit "$status"
