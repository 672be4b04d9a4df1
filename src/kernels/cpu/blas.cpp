#include "kernels/cpu/blas.h"

#include <cblas.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"

extern "C" {
char* openblas_get_corename(void);
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
}

namespace pm {

void openblas_gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const float alpha = 1.0f;
  cblas_sgemm(CblasRowMajor, trans_a == Trans::yes ? CblasTrans : CblasNoTrans,
              trans_b == Trans::yes ? CblasTrans : CblasNoTrans, static_cast<int>(M),
              static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
              static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

std::string blas_core_name() { return openblas_get_corename(); }

std::string blas_best_core_for_cpu() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return "";  // nothing better than what OpenBLAS found itself
}

namespace {

bool same_core(const std::string& a, const std::string& b) { return strcasecmp(a.c_str(), b.c_str()) == 0; }

// Cores whose sgemm is at least as good as `wanted` (newer cores reuse SkylakeX's kernels).
bool core_is_at_least(const std::string& core, const std::string& wanted) {
  if (same_core(core, wanted)) return true;
  if (same_core(wanted, "SkylakeX"))
    return same_core(core, "Cooperlake") || same_core(core, "SapphireRapids");
  if (same_core(wanted, "Haswell"))
    return same_core(core, "Zen") || core_is_at_least(core, "SkylakeX");
  return false;
}

}  // namespace

void blas_fix_core_type_or_reexec(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("PIPEMOE_BLAS_REEXECED")) return;
  std::string best = blas_best_core_for_cpu();
  if (best.empty() || core_is_at_least(blas_core_name(), best)) return;
  setenv("OPENBLAS_CORETYPE", best.c_str(), 1);
  setenv("PIPEMOE_BLAS_REEXECED", "1", 1);
  execv("/proc/self/exe", argv);
  // execv only returns on failure: carry on with the slow kernels rather than stop.
}

void blas_set_threads(int threads) { openblas_set_num_threads(threads < 1 ? 1 : threads); }

int blas_threads() { return openblas_get_num_threads(); }

int default_compute_threads() {
  if (const char* env = std::getenv("PIPEMOE_THREADS")) {
    int t = std::atoi(env);
    PM_REQUIRE(t >= 1, "PIPEMOE_THREADS must be a positive integer, got '{}'", env);
    return t;
  }
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  int local_ranks = 1;
  if (const char* env = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_ranks = std::max(1, std::atoi(env));
  return std::max(1, cores / local_ranks);
}

}  // namespace pm
