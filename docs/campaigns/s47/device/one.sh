#!/usr/bin/env bash
# start.sh then final.sh in one call (env of both)
t0=$(date +%s)
bash .devcache/s47/start.sh
export WAIT_SECONDS=$((WAIT_SECONDS - ($(date +%s) - t0)))
bash .devcache/s47/final.sh
