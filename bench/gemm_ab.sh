#!/usr/bin/env bash
# Our GEMM at a git revision (a) against the working tree (b), on the layer's expert shapes and the
# 2048^3 product, in ONE process per rank: the two builds live side by side (each compiled in its
# own namespace) and run shape by shape, alternately, so the host's 10-30% drift falls on both.
# Separate runs minutes apart cannot see a few percent on these machines; this can.
#
#   bench/gemm_ab.sh REV [ROUNDS=10] [PROCS=2]     e.g. bench/gemm_ab.sh HEAD~1
# PROCS processes run at once, as the layer's ranks do. Prints per process and shape the median
# GFLOP/s of each side, the median time ratio b/a over the rounds (below 1: b is faster), and
# whether the two sides wrote the same bits. B_FLAGS (environment): extra compiler flags for side
# b only, e.g. B_FLAGS=-DGEMM_KC=256 to try a block size by macro against the same revision.
# GEMM_AB_SHAPE=ROWS,M,H (environment): another expert shape than the layer's 1025,512,1024.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/gemm_ab.sh REV [ROUNDS] [PROCS]}
rounds=${2:-10}
procs=${3:-2}
work=$(mktemp -d)
trap '[ -n "${KEEP_AB:-}" ] || rm -rf "$work"' EXIT
ab_flags=(-O3 -march=native -std=c++20 -DNDEBUG)
source bench/ab_sides.sh
ab_sides "$rev" "$work" bench/gemm_ab/shapes.cpp GEMM_AB_RUN kernels/cpu/gemm.cpp kernels/cpu/gemm_unpacked.cpp \
  kernels/cpu/gemm_bf16.cpp kernels/cpu/gemm_bf16_pack.cpp kernels/cpu/gemm_amx.cpp kernels/cpu/thread_pool.cpp \
  core/error.cpp core/aligned.cpp core/tensor.cpp
g++ "${ab_flags[@]}" bench/gemm_ab/main.cpp "${ab_objects[@]}" -o "$work/gemm_ab" -lfmt -lpthread
echo "gemm_ab: a = $(git rev-parse --short "$rev"), b = the working tree; $procs processes at once, $rounds rounds; expert shape ${GEMM_AB_SHAPE:-1025,512,1024} (rows,M,H)"
for p in $(seq "$procs"); do timeout 1800 "$work/gemm_ab" "$rounds" > "$work/out$p" & done
wait
for p in $(seq "$procs"); do echo "-- process $p"; cat "$work/out$p"; done
