#!/bin/bash
# How long `generate` takes to start and how much memory it peaks at: --tokens 1 (the load, the
# packing and one token) on 1 and 2 ranks, fp32 and bf16, two binaries alternately, ROUNDS times;
# a CSV on stdout (wall seconds and the largest process's peak RSS, GNU time). docs/BENCHMARKS.md,
# "Loading a checkpoint in place".
#   bench/inference_start.sh CHECKPOINT ROUNDS OLD_BINARY NEW_BINARY > out/load.csv
set -euo pipefail
ck=$1 rounds=$2
shift 2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
times=$(mktemp)
trap 'rm -f "$times"' EXIT
echo "round,binary,ranks,dtype,wall_s,maxrss_kb"
for r in $(seq 1 "$rounds"); do
  for ranks in 1 2; do
    for dtype in fp32 bf16; do
      for binary in "$@"; do
        launch=("$binary")
        [ "$ranks" = 1 ] || launch=(mpirun -q -n "$ranks" --oversubscribe "$binary")
        /usr/bin/time -f "%e %M" -o "$times" timeout 300 "${launch[@]}" generate --checkpoint "$ck" --prompt "The" \
          --tokens 1 --dtype "$dtype" > /dev/null 2>&1
        read -r wall rss < "$times"
        echo "$r,$binary,$ranks,$dtype,$wall,$rss"
      done
    done
  done
done
