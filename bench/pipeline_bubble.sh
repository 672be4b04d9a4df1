#!/bin/bash
# The pipeline bubble against 1F1B's formula (S - 1) / (M + S - 1): the demo model at pp 2 on 2
# ranks and pp 4 on 4 ranks, 2 to 8 micro-batches, 1F1B and GPipe; interleaved rounds, medians
# (bench/train_variants.py). The bubble is the share of a step every rank waited for the other
# stages (pipeline_bubble in the run's JSON), which includes the links and the stages' imbalance
# (the last stage also computes the head). Writes out/pipeline_bubble_pp2.csv and _pp4.csv.
#
#   bench/pipeline_bubble.sh [--rounds N]      (ONLY_PP4=1: the 4-rank part only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=2
[ "${1:-}" = "--rounds" ] && ROUNDS=$2
C="--config configs/demo.json --degree 1 --max-steps 10 --set log_every=5 --set eval_every=100 --set batch_size=4"
V2=() V4=()
for m in 2 4 8; do V2+=(--variant "pp2 M$m 1f1b=--pp 2 --set micro_batches=$m"); done
for m in 4 8 16; do V4+=(--variant "pp4 M$m 1f1b=--pp 4 --set micro_batches=$m"); done  # 1F1B needs M >= S
V2+=(--variant "pp2 M4 gpipe=--pp 2 --set micro_batches=4 --set pipeline_schedule=gpipe")
[ -n "${ONLY_PP4:-}" ] || /usr/bin/python3 bench/train_variants.py --np 2 --rounds "$ROUNDS" --common "$C" "${V2[@]}" --csv out/pipeline_bubble_pp2.csv
/usr/bin/python3 bench/train_variants.py --np 4 --rounds "$ROUNDS" --common "$C" "${V4[@]}" --csv out/pipeline_bubble_pp4.csv
