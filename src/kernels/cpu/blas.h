// OpenBLAS: the set-up that makes it use the right kernels on this CPU, and its sgemm for
// comparisons (the engine's own GEMM is in gemm.h; PyTorch, our oracle and rival, uses OpenBLAS).
//
// Debian's OpenBLAS 0.3.21 picks its kernels by CPU model at load time and falls back to generic
// ones on CPUs newer than it knows (seen: ~22 instead of ~130 GFLOP/s per core). We compare the
// CPU's features with the core OpenBLAS chose and, when they disagree, restart the process once
// with OPENBLAS_CORETYPE set to the best core the features allow. A CPU without AVX-512 is never
// told to use AVX-512 kernels.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/cpu/gemm.h"

namespace pm {

// Row-major C[M,N] = op(A) op(B) + beta * C through OpenBLAS (benchmarks only).
void openblas_gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Call first thing in main(), before MPI starts: may re-execute the program (same pid, same argv)
// with OPENBLAS_CORETYPE set. Returns normally when no restart is needed.
void blas_fix_core_type_or_reexec(char** argv);

// The core type OpenBLAS uses and the best one this CPU's features allow.
std::string blas_core_name();
std::string blas_best_core_for_cpu();

void blas_set_threads(int threads);
int blas_threads();

// Threads for this process's kernels: PIPEMOE_THREADS if set, else the cores of this machine
// divided among the ranks that share it (OMPI_COMM_WORLD_LOCAL_SIZE), at least 1.
int default_compute_threads();

}  // namespace pm
