#!/bin/bash
# What saving a checkpoint costs a training run: one step of a 72.6M-parameter MoE model (the demo's
# configuration widened: d_model 512, 16 experts of hidden 1024 in every block) on 2 ranks, with and
# without --set save=, each binary in turn, ROUNDS times; a CSV on stdout: the run's wall seconds,
# the largest rank's peak RSS and, where the binary logs it, the save's own seconds.
# docs/BENCHMARKS.md, "A checkpoint written tensor by tensor".
#   bench/checkpoint_save.sh ROUNDS SAVE_DIR BINARY... > out/save.csv   (SAVE_DIR is deleted first)
set -euo pipefail
rounds=$1 save_dir=$2
shift 2
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "round,binary,save,wall_s,peak_mb,written_s"
for r in $(seq 1 "$rounds"); do
  for save in "$save_dir" ""; do
    for binary in "$@"; do
      rm -rf "$save_dir"
      out=$({ /usr/bin/time -f "WALL %e" timeout --kill-after=10 300 mpirun -q -n 2 --oversubscribe "$binary" train \
        --config configs/demo.json --max-steps 1 --set d_model=512 --set heads=8 --set mlp_hidden=2048 \
        --set experts=16 --set expert_hidden=1024 --set moe_every=1 --set warmup_steps=1 --set plot=none \
        --set eval_every=1000 --set degree=1 --set save="$save"; } 2>&1)
      wall=$(grep -o "WALL [0-9.]*" <<< "$out" | cut -d' ' -f2)
      peak=$(grep -o '"peak_rss_mb":[0-9.]*' <<< "$out" | cut -d: -f2)
      written=$(grep -o "written in [0-9.]*" <<< "$out" | cut -d' ' -f3 || true)
      echo "$r,$binary,${save:+yes},$wall,$peak,$written"
    done
  done
done
