#!/usr/bin/env bash
# start.sh then final.sh in one call (env of both)
t0=$(date +%s)
NOPACK=1 bash .devcache/s48/start.sh  # one return: final.sh packs
export WAIT_SECONDS=$((WAIT_SECONDS - ($(date +%s) - t0)))
bash .devcache/s48/final.sh
