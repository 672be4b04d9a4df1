// The CUDA backend's GEMM: one thread block of 256 per tile of C (64 x 64, or 128 x 128 for large
// products), depths staged through shared memory (16, or 8, at a time). Each element of C is one fmaf chain over
// the depth in order (in bf16, in vdpbf16ps's pair order), started from C, the bias or zero: the
// chain kernels/cpu/gemm.h defines, so the GPU writes the CPU's bits whatever M or the tiling.
// No tensor cores, no cuBLAS: they accumulate in orders of their own choosing (and cuBLAS's
// choice depends on M, which pipelining changes); any faster kernel must keep this chain.
#include "kernels/cuda/device_kernels.h"
#include "kernels/cuda/device_memory.h"

namespace pm::cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16 per block, both tilings

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

// Each thread owns kPer x kPer elements of its block's tile: kPer / 4 groups of 4 consecutive
// rows, 64 apart (rows 64 g + 4 ty + [0, 4)), and likewise of columns (64 g + 4 tx + [0, 4)). So a
// stage's operands for one depth are read from shared memory 4 at a time (one 16-byte load per
// group: a warp's 16 column groups are 256 consecutive bytes, its 2 row groups broadcasts), 8 x 8
// multiply-adds per 4 loads in the large tiling. The tiles' rows are padded by 4 floats: 16-byte
// aligned still, and a stage's stores (8 or 16 depths of one row by consecutive threads) fall in
// different banks. The depth goes through shared memory kDepth at a time; while a stage is
// multiplied, each thread holds its share of the next one's operands in registers (kLoads of A,
// kLoads of B), loaded before the multiply-adds so that the global loads' latency hides behind them.
template <int kTile, int kDepth>
struct alignas(16) Stage {
  float a[kDepth][kTile + 4];  // a[p][i] = op(A)(row0 + i, depth of chain position k0 + p)
  float b[kDepth][kTile + 4];  // b[p][j] = op(B)(that depth, col0 + j)
};

template <int kTile, int kDepth>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmCall g) {
  constexpr int kPer = kTile / 16, kGroups = kPer / 4, kLoads = kTile * kDepth / kThreads;
  __shared__ Stage<kTile, kDepth> stage;
  auto& a_tile = stage.a;
  auto& b_tile = stage.b;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile, col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  // the chain's length: bf16 pads an odd depth to a whole pair
  const int64_t depth = g.bf16 ? (g.K + 1) / 2 * 2 : g.K;
  // this thread's i-th row and j-th column within the tile
  auto row_of = [&](int i) { return 64 * (i / 4) + 4 * ty + i % 4; };
  auto col_of = [&](int j) { return 64 * (j / 4) + 4 * tx + j % 4; };

  float c[kPer][kPer];
  for (int i = 0; i < kPer; ++i)
    for (int j = 0; j < kPer; ++j) {
      const int64_t r = row0 + row_of(i), col = col0 + col_of(j);
      float start = 0.0f;
      if (r < g.M && col < g.N) start = g.beta != 0.0f ? g.c[r * g.ldc + col] : (g.bias ? g.bias[col] : 0.0f);
      c[i][j] = start;
    }

  // This thread's kLoads elements of a stage, e = threadIdx.x + kThreads l: where each sits in the
  // tiles; consecutive threads walk along memory (the depth for A rows, the rows for a transposed A).
  auto a_at = [&](int e, int& i, int& p) {
    i = g.trans_a ? e % kTile : e / kDepth;
    p = g.trans_a ? e / kTile : e % kDepth;
  };
  auto b_at = [&](int e, int& j, int& p) {
    j = g.trans_b ? e / kDepth : e % kTile;
    p = g.trans_b ? e % kDepth : e / kTile;
  };
  // position p of the chain: depth p (fp32) or p ^ 1 (bf16 pairs); past K a zero member
  float next_a[kLoads], next_b[kLoads];
  auto load_stage = [&](int64_t k0) {
    for (int l = 0; l < kLoads; ++l) {
      int i, j, p;
      a_at(threadIdx.x + kThreads * l, i, p);
      int64_t pos = k0 + p, d = g.bf16 ? (pos ^ 1) : pos;
      next_a[l] = (row0 + i < g.M && pos < depth && d < g.K) ? load_a(g, row0 + i, d) : 0.0f;
      b_at(threadIdx.x + kThreads * l, j, p);
      pos = k0 + p;
      d = g.bf16 ? (pos ^ 1) : pos;
      next_b[l] = (col0 + j < g.N && pos < depth && d < g.K) ? load_b(g, d, col0 + j) : 0.0f;
    }
  };
  auto store_stage = [&] {
    for (int l = 0; l < kLoads; ++l) {
      int i, j, p;
      a_at(threadIdx.x + kThreads * l, i, p);
      a_tile[p][i] = next_a[l];
      b_at(threadIdx.x + kThreads * l, j, p);
      b_tile[p][j] = next_b[l];
    }
  };

  if (depth > 0) load_stage(0);
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    store_stage();
    __syncthreads();
    if (k0 + kDepth < depth) load_stage(k0 + kDepth);
    // only the chain's own positions: a multiply-add of padding zeros could turn -0 into +0
    const int steps = static_cast<int>(depth - k0 < kDepth ? depth - k0 : kDepth);
    for (int p = 0; p < steps; ++p) {
      float a[kPer], b[kPer];
      for (int q = 0; q < kGroups; ++q) {
        const float4 a4 = *reinterpret_cast<const float4*>(&a_tile[p][64 * q + 4 * ty]);
        const float4 b4 = *reinterpret_cast<const float4*>(&b_tile[p][64 * q + 4 * tx]);
        a[4 * q] = a4.x, a[4 * q + 1] = a4.y, a[4 * q + 2] = a4.z, a[4 * q + 3] = a4.w;
        b[4 * q] = b4.x, b[4 * q + 1] = b4.y, b[4 * q + 2] = b4.z, b[4 * q + 3] = b4.w;
      }
      for (int i = 0; i < kPer; ++i)
        for (int j = 0; j < kPer; ++j) c[i][j] = __fmaf_rn(a[i], b[j], c[i][j]);
    }
    __syncthreads();
  }

  for (int i = 0; i < kPer; ++i)
    for (int j = 0; j < kPer; ++j) {
      const int64_t r = row0 + row_of(i), col = col0 + col_of(j);
      if (r < g.M && col < g.N) g.c[r * g.ldc + col] = c[i][j];
    }
}

// Which tiling a product gets: 128 x 128 tiles (8 x 8 elements per thread: twice the multiply-adds
// per word read from shared memory) once they are enough to give every multiprocessor one; else
// 64 x 64 (4 x 4), four times the blocks (at 1024 x 1024 on an H200's 132: 64 large tiles would
// leave half the GPU idle). Either way the same chains, the same bits.
bool large_tiles(const GemmCall& g, int multiprocessors) {
  return ((g.M + 127) / 128) * ((g.N + 127) / 128) >= multiprocessors;
}
int tile_of(const GemmCall& g, int multiprocessors) { return large_tiles(g, multiprocessors) ? 128 : 64; }

}  // namespace

#ifndef PM_CUDA_EMULATION  // (tests/cuda_emulation: the kernels run on CPU threads)
void gemm(const GemmCall& call, cudaStream_t stream) {
  if (call.M == 0 || call.N == 0) return;
  // (per calling thread: ranks as threads may each drive their own GPU)
  static thread_local const int multiprocessors = [] {
    int device = 0, count = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return count;
  }();
  const int tile = tile_of(call, multiprocessors);
  const dim3 grid(static_cast<unsigned>((call.N + tile - 1) / tile), static_cast<unsigned>((call.M + tile - 1) / tile));
  if (tile == 128)
    gemm_kernel<128, 8><<<grid, kThreads, 0, stream>>>(call);
  else
    gemm_kernel<64, 16><<<grid, kThreads, 0, stream>>>(call);
}
#endif

}  // namespace pm::cuda
