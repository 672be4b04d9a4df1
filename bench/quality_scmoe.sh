#!/usr/bin/env bash
# ScMoE vs top-2 MoE model quality on the Brown corpus: the same tokens, STEPS steps (default
# 800), seeds SEEDS (default "1 2"); validation loss every 200 steps into out/quality_<cfg>_s<seed>.csv.
# Seed 1's models are kept (out/quality_ck_<cfg>) for the inference comparison.
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
steps=${STEPS:-800}
for seed in ${SEEDS:-1 2}; do
  for cfg in demo scmoe; do
    save=""; [ $seed = 1 ] && save=out/quality_ck_$cfg
    timeout 3600 mpirun -q --oversubscribe -np 2 ${PIPEMOE_BIN:-build/pipemoe} train --config configs/$cfg.json \
      --max-steps $steps --seed $seed --set save=$save --set eval_every=200 --set log_every=100 --degree 1 \
      --log-csv out/quality_${cfg}_s$seed.csv > out/quality_${cfg}_s$seed.out 2>&1
  done
done
echo done > out/quality.done
