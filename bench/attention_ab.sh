#!/usr/bin/env bash
# Attention's core (kernels/cpu/attention.cpp and chain_product.cpp) at a git revision (a) against
# the working tree (b), in ONE process: the two builds live side by side (each compiled in its own
# namespace) and run pass by pass, alternately, so the host's drift falls on both (separate runs of
# build/bench/attention_core minutes apart swung 0.55x to 1.5x on this host). Prints each pass's
# median milliseconds per side, the median ratio b/a over the rounds with its quartiles (below 1: b
# is faster), and whether the two sides wrote the same bits (exit 1 if not).
#
#   bench/attention_ab.sh REV [ROUNDS=200]      e.g. bench/attention_ab.sh HEAD~1
# ATT_AB_SHAPE=B,S,heads,kv_heads,hd (environment): another shape than the bundled models' 12,128,4,4,48.
# B_FLAGS (environment): extra compiler flags for side b (bench/ab_sides.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/attention_ab.sh REV [ROUNDS]}
rounds=${2:-200}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ab_flags=(-O3 -march=native -std=c++20 -DNDEBUG -ffp-contract=off -fno-trapping-math -Wno-psabi)
source bench/ab_sides.sh
# the core and what it calls (chain_product falls back on gemm without AVX-512)
ab_sides "$rev" "$work" bench/attention_ab/run.cpp ATT_AB_RUN kernels/cpu/attention.cpp kernels/cpu/chain_product.cpp \
  kernels/cpu/gemm.cpp kernels/cpu/gemm_unpacked.cpp kernels/cpu/gemm_bf16.cpp kernels/cpu/gemm_bf16_pack.cpp \
  kernels/cpu/gemm_amx.cpp kernels/cpu/thread_pool.cpp core/error.cpp core/aligned.cpp core/tensor.cpp
g++ "${ab_flags[@]}" bench/attention_ab/main.cpp "${ab_objects[@]}" -o "$work/attention_ab" -lfmt -lpthread
echo "attention_ab: a = $(git rev-parse --short "$rev"), b = the working tree; $rounds rounds; shape ${ATT_AB_SHAPE:-12,128,4,4,48} (B,S,heads,kv_heads,hd)"
timeout 1800 "$work/attention_ab" "$rounds"
