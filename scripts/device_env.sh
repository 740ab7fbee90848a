# The environment of a device call (sourced by scripts/bench_device_call.sh, scripts/brats_device_call.sh and
# scripts/brats_arms.sh):
#   device_env TRITON_HOME_DIR
# installs the wheels of monai and nibabel carried in $WHEELS (default .whl: the device has neither) into /tmp/site
# unless a warm machine has them there already (no --upgrade: a second process started beside a running one does
# not rewrite modules the first has imported), puts them and src/ on PYTHONPATH, and keeps Triton's cache of this
# project's kernels (Bi-WKV, the fused norms) in TRITON_HOME_DIR/.triton/cache, apart from Inductor's generated
# kernels (TRITON_CACHE_DIR, set, would take those too), so that the caller can return it and a fresh machine can
# skip compiling them. Python's bytecode goes to /tmp/pycache (PYTHONPYCACHEPREFIX): session 28's profile of a GPU
# `rwkvseg predict` found 10 of its seconds compiling about 3,700 modules from source in the second process as in
# the first (no bytecode kept there between processes). Returns non-zero when the install or the folder fails.
device_env() {
  local wheels=${WHEELS:-.whl}
  if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$wheels"/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PWD/src
  else
    export PYTHONPATH=$PWD/src
  fi
  export PYTHONUNBUFFERED=1
  export PYTHONPYCACHEPREFIX=/tmp/pycache
  mkdir -p "$1" || return 1
  TRITON_HOME=$(realpath "$1")
  export TRITON_HOME
  unset TRITON_CACHE_DIR
}

# export_int8 FOLDER CHECKPOINT NAME [CHECKPOINT NAME ...]: each CHECKPOINT (a run's best, without suffix) as the
# int8 release NAME in FOLDER (rwkvseg.released.export_release), in one Python process, after device_env.
export_int8() {
  python3 -c "import sys; from pathlib import Path; from rwkvseg.released import export_release
pairs = sys.argv[2:]
for checkpoint, name in zip(pairs[::2], pairs[1::2], strict=True):
    export_release(Path(checkpoint), name, Path(sys.argv[1]), precision='int8')" "$@"
}
