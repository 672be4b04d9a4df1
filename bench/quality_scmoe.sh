#!/usr/bin/env bash
# ScMoE vs top-2 MoE model quality on the Brown corpus: same tokens, 2000 steps, seeds 1-3.
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for seed in 1 2 3; do
  for cfg in demo scmoe; do
    save=""; [ $seed = 1 ] && save=out/quality_ck_$cfg  # seed 1's models, for generation benchmarks
    timeout 3600 mpirun -q --oversubscribe -np 2 ${PIPEMOE_BIN:-build/pipemoe} train --config configs/$cfg.json --max-steps 2000 \
      --seed $seed --set save=$save --set eval_every=250 --set log_every=250 --degree 1 \
      --log-csv out/quality_${cfg}_s$seed.csv > out/quality_${cfg}_s$seed.out 2>&1
  done
done
echo done > out/quality.done
