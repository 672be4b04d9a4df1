#!/bin/sh
# What AMX's bf16 tile product computes: runs TDPBF16PS with 1, 2, 4, 8 and 16 depth pairs and
# prints, for each candidate order, the share of results it gets wrong (docs/BENCHMARKS.md, "bf16
# on Intel AMX"). Needs a CPU with AMX-BF16 and g++ 12 or later.
set -e
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -O2 -mamx-tile -mamx-bf16 dump.cpp -o "$work/dump"
for pairs in 1 2 4 8 16; do
  echo "== $pairs depth pairs per instruction"
  "$work/dump" "$pairs" "${TRIALS:-8}" | /usr/bin/python3 orders.py
done
