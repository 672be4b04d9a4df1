// pipemoe bench gemm: GEMM speed on this machine, ours and OpenBLAS, on every rank at once.
//
//   mpirun -q -np 2 build/pipemoe bench gemm [--model-dim 512 --hidden 1024 --rows 1024,256]
//       [--repeat 10] [--csv gemm.csv] [--dtype bf16]
// The peak is the best median of the large square product (2048^3); the expert shapes are the
// GEMMs of an expert FFN (rows x M x H and rows x H x M, forward and backward forms). With
// --dtype bf16 our bf16 GEMMs run beside the fp32 ones: their own peak, and their speed-up over fp32.
// With `pipemoe --backend cuda`, the backend's GPU GEMM too (B prepacked on the GPU, as an expert's
// weights are; A copied in and C out on every call, as the backend does today): rows "cuda"; and
// the kernel alone on operands already in device memory: rows "gpu-kernel".
#include <map>

#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/gemm_timing.h"
#include "core/csv.h"
#include "core/rng.h"
#include "core/stats.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cuda/cuda_backend.h"

namespace pm::cli {
namespace {

struct GemmBenchOptions {
  int64_t model_dim = 512;
  int64_t hidden = 1024;
  std::vector<int64_t> rows = {1024, 256};
  int repeat = 10;
  std::string csv;
  Precision dtype = Precision::fp32;
};

struct GemmCase {
  std::string name;
  Trans ta, tb;
  int64_t M, N, K;
};

std::vector<GemmCase> cases(const GemmBenchOptions& o) {
  std::vector<GemmCase> out = {{"square 2048", Trans::no, Trans::no, 2048, 2048, 2048}};
  for (int64_t r : o.rows) {
    std::string rows = std::to_string(r);
    out.push_back({"fwd u.W1 r=" + rows, Trans::no, Trans::no, r, o.hidden, o.model_dim});
    out.push_back({"fwd a.W2 r=" + rows, Trans::no, Trans::no, r, o.model_dim, o.hidden});
    out.push_back({"bwd dy.W2^T r=" + rows, Trans::no, Trans::yes, r, o.hidden, o.model_dim});
    out.push_back({"bwd dh.W1^T r=" + rows, Trans::no, Trans::yes, r, o.model_dim, o.hidden});
    out.push_back({"wgrad a^T.dy r=" + rows, Trans::yes, Trans::no, o.hidden, o.model_dim, r});
  }
  return out;
}

int run_gemm_bench(Context& ctx, const GemmBenchOptions& o) {
  PM_REQUIRE(o.repeat >= 1, "--repeat must be at least 1, got {}", o.repeat);
  PM_REQUIRE(o.model_dim > 0 && o.hidden > 0, "--model-dim and --hidden must be positive");
  for (int64_t r : o.rows) PM_REQUIRE(r > 0, "--rows must be positive, got {}", r);
  std::unique_ptr<CsvWriter> csv;
  if (ctx.rank() == 0 && !o.csv.empty())
    csv = std::make_unique<CsvWriter>(o.csv, std::vector<std::string>{"shape", "impl", "M", "N", "K", "ranks", "threads",
                                                                      "min_gflops", "median_gflops", "max_gflops", "pct_of_peak"});
  struct Row {
    std::string name, impl;
    GemmCase c;
    Summary gflops;
  };
  std::vector<Row> rows;
  // first: OpenBLAS's threads keep spinning for a while after each call, and would take cores from it
  const double ceiling = fma_ceiling_all_ranks(ctx.comm);
  // the bf16 GEMMs' own ceiling: the instruction of the order they run in
  const bool amx = bf16_order() == Bf16Order::amx;
  const double ceiling_bf16 =
      o.dtype != Precision::bf16 ? 0.0 : amx ? amx_ceiling_all_ranks(ctx.comm) : bf16_dot_ceiling_all_ranks(ctx.comm);
  for (const GemmCase& c : cases(o)) {
    std::vector<float> A(c.M * c.K), B(c.K * c.N), C(c.M * c.N);
    Rng(1, 1).fill_normal(A.data(), A.size(), 0, 1);
    Rng(1, 2).fill_normal(B.data(), B.size(), 0, 1);
    const int64_t lda = c.ta == Trans::no ? c.K : c.M, ldb = c.tb == Trans::no ? c.N : c.K;
    PackedB packed, packed_bf16;
    pack_b(c.tb, c.K, c.N, B.data(), ldb, packed);  // weights are packed once per pass
    if (o.dtype == Precision::bf16) pack_b_bf16(c.tb, c.K, c.N, B.data(), ldb, packed_bf16);
    const double flops = 2.0 * c.M * c.N * c.K;
    auto measure = [&](const char* impl, const std::function<void()>& fn) {
      ctx.comm.barrier();  // every rank computes at the same time, as in the layer
      std::vector<double> s = time_calls(o.repeat, fn);
      std::vector<double> gf;
      for (double t : s) gf.push_back(flops / t / 1e9);
      Summary mine = summarize(gf);
      double v[3] = {mine.min, mine.median, mine.max};
      ctx.comm.allreduce(v, v, 3, DType::f64, ReduceOp::min);  // the slowest rank
      rows.push_back({c.name, impl, c, {v[0], v[1], v[2]}});
    };
    measure("pipemoe", [&] { gemm_packed(c.ta, c.M, A.data(), lda, packed, 0.0f, C.data(), c.N); });
    if (o.dtype == Precision::bf16)
      measure("bf16", [&] { gemm_packed(c.ta, c.M, A.data(), lda, packed_bf16, 0.0f, C.data(), c.N); });
    measure("openblas", [&] { openblas_gemm(c.ta, c.tb, c.M, c.N, c.K, A.data(), lda, B.data(), ldb, 0.0f, C.data(), c.N); });
    if (ctx.backend.device() != Device::cpu) {
      for (Precision p : {Precision::fp32, Precision::bf16}) {
        if (p == Precision::bf16 && o.dtype != Precision::bf16) continue;
        std::unique_ptr<PackedMatrix> on_device = ctx.backend.pack_matrix(p, c.tb, c.K, c.N, B.data(), ldb);
        measure(p == Precision::bf16 ? "cuda-bf16" : "cuda",
                [&] { ctx.backend.gemm_prepacked(c.ta, c.M, A.data(), lda, *on_device, 0.0f, C.data(), c.N); });
      }
      // the kernel alone, its operands already on the GPU: what the copies above cost, by difference
      measure("gpu-kernel", cuda_gemm_kernel_alone(Precision::fp32, c.ta, c.tb, c.M, c.N, c.K));
    }
  }
  if (ctx.rank() != 0) return 0;
  // fp32 CPU rows against the best fp32 CPU product of the square case; bf16 rows, and the GPU's,
  // against their own
  auto group = [](const std::string& impl) { return impl == "pipemoe" || impl == "openblas" ? std::string("fp32") : impl; };
  std::map<std::string, double> peaks;
  double ours_fp32 = 0;
  for (const Row& r : rows) {
    if (r.name != "square 2048") continue;
    peaks[group(r.impl)] = std::max(peaks[group(r.impl)], r.gflops.median);
    if (r.impl == "pipemoe") ours_fp32 = r.gflops.median;
  }
  const double peak = peaks["fp32"], peak_bf16 = peaks["bf16"];
  std::printf("GEMM, float32, %d ranks computing at once, %d threads each, OpenBLAS core %s, our ISA %s\n",
              ctx.world(), compute_threads(), blas_core_name().c_str(), gemm_isa().c_str());
  std::printf("peak (best median of the 2048^3 product): %.1f GFLOP/s per rank\n", peak);
  if (ceiling > 0)
    std::printf("the cores' FMA ceiling (independent FMA chains, no memory, every rank at once): %.1f GFLOP/s per rank; "
                "the peak is %.0f%% of it\n", ceiling, 100.0 * peak / ceiling);
  if (o.dtype == Precision::bf16)
    std::printf("bf16 GEMMs (%s): peak %.1f GFLOP/s per rank, %.2fx our fp32 GEMM on the same product\n",
                gemm_bf16_path().c_str(), peak_bf16, peak_bf16 / ours_fp32);
  if (ceiling_bf16 > 0)
    std::printf("the cores' bf16 %s ceiling (%s, every rank at once): %.1f GFLOP/s per rank; the bf16 peak is %.0f%% "
                "of it\n", amx ? "AMX" : "dot-product", amx ? "independent tile products, operands in tiles"
                                                             : "independent vdpbf16ps chains",
                ceiling_bf16, 100.0 * peak_bf16 / ceiling_bf16);
  if (peaks.count("cuda"))
    std::printf("GPU GEMM (%s, copies of A and C included): peak %.1f GFLOP/s per rank, %.1fx our fp32 CPU GEMM\n",
                ctx.backend.name().c_str(), peaks["cuda"], peaks["cuda"] / ours_fp32);
  if (peaks.count("gpu-kernel"))
    std::printf("the GPU GEMM kernel alone (operands already in device memory, rows gpu-kernel): peak %.1f GFLOP/s\n",
                peaks["gpu-kernel"]);
  std::printf("%-20s %-9s %6s %6s %6s %8s %8s %8s %7s\n", "shape", "impl", "M", "N", "K", "min", "median", "max", "%peak");
  for (const Row& r : rows) {
    double pct = 100.0 * r.gflops.median / peaks[group(r.impl)];
    std::printf("%-20s %-9s %6ld %6ld %6ld %8.1f %8.1f %8.1f %6.0f%%", r.name.c_str(), r.impl.c_str(),
                static_cast<long>(r.c.M), static_cast<long>(r.c.N), static_cast<long>(r.c.K), r.gflops.min,
                r.gflops.median, r.gflops.max, pct);
    if (r.impl == "bf16" || r.impl == "cuda-bf16")  // the row before it: the fp32 GEMM on the same shape
      std::printf("  %.2fx fp32", r.gflops.median / (&r)[-1].gflops.median);
    std::printf("\n");
    if (csv)
      csv->row({r.name, r.impl, std::to_string(r.c.M), std::to_string(r.c.N), std::to_string(r.c.K),
                std::to_string(ctx.world()), std::to_string(compute_threads()), fmt::format("{:.2f}", r.gflops.min),
                fmt::format("{:.2f}", r.gflops.median), fmt::format("{:.2f}", r.gflops.max), fmt::format("{:.1f}", pct)});
  }
  return 0;
}

}  // namespace

void add_bench_gemm_command(CLI::App& bench, CommandFn& run) {
  auto o = std::make_shared<GemmBenchOptions>();
  CLI::App* cmd = bench.add_subcommand("gemm", "GEMM speed (ours and OpenBLAS) on every rank at once");
  cmd->add_option("--model-dim", o->model_dim, "M of the expert shapes")->capture_default_str();
  cmd->add_option("--hidden", o->hidden, "H of the expert shapes")->capture_default_str();
  cmd->add_option("--rows", o->rows, "rows per expert GEMM (e.g. degree 1 and 4)")->delimiter(',')->capture_default_str();
  cmd->add_option("--repeat", o->repeat, "timed calls per shape")->capture_default_str();
  cmd->add_option("--csv", o->csv, "write the table as CSV");
  add_dtype_option(cmd, o->dtype, "bf16: time our bf16 GEMMs too, against their own peak and against fp32");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_gemm_bench(ctx, *o); }; });
}

}  // namespace pm::cli
