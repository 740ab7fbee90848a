#!/usr/bin/env bash
set -uo pipefail
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --target /tmp/tsite .devcache/s48/tw/*.whl .whl/*.whl
export PYTHONPATH=/tmp/tsite:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
timeout ${TEST_TIMEOUT:-140} python3 -m pytest -p no:cacheprovider -m gpu -q -o addopts= tests/layers tests/train/test_train3d.py tests/test_memory_format.py 2>&1 | tail -n 25
echo "tests done $(($(date +%s) - t0)) s"
