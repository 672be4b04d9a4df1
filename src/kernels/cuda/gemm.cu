// The CUDA backend's GEMM: one thread block per 64 x 64 tile of C, each thread a 4 x 4 block of
// it, depths staged through shared memory 16 at a time. Each element of C is one fmaf chain over
// the depth in order (in bf16, in vdpbf16ps's pair order), started from C, the bias or zero: the
// chain kernels/cpu/gemm.h defines, so the GPU writes the CPU's bits whatever M or the tiling.
// Plain, not fast: tensor cores and cuBLAS accumulate in orders of their own choosing (and
// cuBLAS's choice depends on M, which pipelining changes); a faster kernel must keep this chain.
#include "kernels/cuda/device_kernels.h"

namespace pm::cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kDepth = 16, kThreads = 256, kPer = 4;

__device__ inline float bf16_bits_to_float(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }

// round to nearest even, NaN stays NaN: core/tensor.h's float_to_bf16
__device__ inline float round_to_bf16(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return bf16_bits_to_float(0x7fc0);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return bf16_bits_to_float(static_cast<uint16_t>((bits + rounding) >> 16));
}

// op(A)(i, d), op(B)(d, j) for in-range indices.
__device__ inline float load_a(const GemmCall& g, int64_t i, int64_t d) {
  const int64_t at = g.trans_a ? d * g.lda + i : i * g.lda + d;
  if (g.a_bf16) return bf16_bits_to_float(g.a_bf16[at]);
  return g.bf16 ? round_to_bf16(g.a[at]) : g.a[at];
}
__device__ inline float load_b(const GemmCall& g, int64_t d, int64_t j) {
  const float v = g.trans_b ? g.b[j * g.ldb + d] : g.b[d * g.ldb + j];
  return g.bf16 ? round_to_bf16(v) : v;
}

__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmCall g) {
  __shared__ float a_tile[kDepth][kTileM + 1];
  __shared__ float b_tile[kDepth][kTileN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileM, col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  // the chain's length: bf16 pads an odd depth to a whole pair
  const int64_t depth = g.bf16 ? (g.K + 1) / 2 * 2 : g.K;

  float c[kPer][kPer];
  for (int i = 0; i < kPer; ++i)
    for (int j = 0; j < kPer; ++j) {
      const int64_t r = row0 + ty * kPer + i, col = col0 + tx * kPer + j;
      float start = 0.0f;
      if (r < g.M && col < g.N) start = g.beta != 0.0f ? g.c[r * g.ldc + col] : (g.bias ? g.bias[col] : 0.0f);
      c[i][j] = start;
    }

  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    // stage position p of the chain: depth p (fp32) or p ^ 1 (bf16 pairs); past K a zero member
    for (int e = threadIdx.x; e < kTileM * kDepth; e += kThreads) {
      // consecutive threads walk along memory: the depth for A rows, the rows for a transposed A
      const int i = g.trans_a ? e % kTileM : e / kDepth, p = g.trans_a ? e / kTileM : e % kDepth;
      const int64_t r = row0 + i, pos = k0 + p, d = g.bf16 ? (pos ^ 1) : pos;
      a_tile[p][i] = (r < g.M && pos < depth && d < g.K) ? load_a(g, r, d) : 0.0f;
    }
    for (int e = threadIdx.x; e < kTileN * kDepth; e += kThreads) {
      const int j = g.trans_b ? e / kDepth : e % kTileN, p = g.trans_b ? e % kDepth : e / kTileN;
      const int64_t col = col0 + j, pos = k0 + p, d = g.bf16 ? (pos ^ 1) : pos;
      b_tile[p][j] = (col < g.N && pos < depth && d < g.K) ? load_b(g, d, col) : 0.0f;
    }
    __syncthreads();
    // only the chain's own positions: a multiply-add of padding zeros could turn -0 into +0
    const int steps = static_cast<int>(depth - k0 < kDepth ? depth - k0 : kDepth);
    for (int p = 0; p < steps; ++p) {
      float a[kPer], b[kPer];
      for (int i = 0; i < kPer; ++i) a[i] = a_tile[p][ty * kPer + i];
      for (int j = 0; j < kPer; ++j) b[j] = b_tile[p][tx * kPer + j];
      for (int i = 0; i < kPer; ++i)
        for (int j = 0; j < kPer; ++j) c[i][j] = __fmaf_rn(a[i], b[j], c[i][j]);
    }
    __syncthreads();
  }

  for (int i = 0; i < kPer; ++i)
    for (int j = 0; j < kPer; ++j) {
      const int64_t r = row0 + ty * kPer + i, col = col0 + tx * kPer + j;
      if (r < g.M && col < g.N) g.c[r * g.ldc + col] = c[i][j];
    }
}

}  // namespace

#ifndef PM_CUDA_EMULATION  // (tests/unit/cuda_emulation: the kernels run on CPU threads)
void gemm(const GemmCall& call, cudaStream_t stream) {
  if (call.M == 0 || call.N == 0) return;
  const dim3 grid(static_cast<unsigned>((call.N + kTileN - 1) / kTileN), static_cast<unsigned>((call.M + kTileM - 1) / kTileM));
  gemm_kernel<<<grid, kThreads, 0, stream>>>(call);
}
#endif

}  // namespace pm::cuda
