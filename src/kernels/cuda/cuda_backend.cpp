#include "kernels/cuda/cuda_backend.h"

#include "core/block_cache.h"
#include "core/error.h"
#include "core/local_rank.h"
#include "core/tensor.h"

#if PIPEMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "kernels/cuda/device_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/forwarding_backend.h"

namespace pm {
namespace {

using cuda::check;
using cuda::DeviceBuffer;
using cuda::download;
using cuda::upload;
using cuda::upload_rows;

// One calling thread's stream and staging buffers (ranks as threads share the backend).
struct ThreadState {
  int device = -1;
  cudaStream_t stream = nullptr;
  // a GEMM's operands by role: a: A (inputs u, dy, activations), b: B (or the saved rows), c: C
  // (the pre-activation, its gradient, a weight gradient), d: activations, e: the second GEMM's C
  DeviceBuffer a, b, c, d, e;
  // rows gathered from wherever they sit, before they are copied in (one pinned block per operand)
  cuda::PinnedBuffer host_a, host_b, host_a16, host_out;  // host_out: rows on their way to OutputRows' pointers
  ~ThreadState() {
    if (stream) cudaStreamDestroy(stream);
  }
};

struct CudaPackedMatrix final : PackedMatrix {
  Precision precision;
  Trans trans_b;
  int64_t K, N;
  DeviceBuffer b;  // op(B)'s storage as given: [K, N], or [N, K] with trans_b
};

struct CudaPackedExpert final : PackedExpert {
  Activation activation;
  Precision precision;
  int64_t M = 0, H = 0;
  DeviceBuffer w1, w2;  // W1 [M, H1], W2 [H, M]
  const float* b1 = nullptr;
  const float* b2 = nullptr;
  mutable DeviceBuffer b1_dev, b2_dev;  // the biases as they are when a forward runs
};

class CudaBackend final : public ForwardingBackend {
 public:
  explicit CudaBackend(int device) : ForwardingBackend(cpu_backend()), device_(device) {
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    gpu_ = std::string(prop.name) + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor);
  }

  std::string name() const override { return "cuda (" + gpu_ + "; host kernels: " + host_.name() + ")"; }
  Device device() const override { return Device::cuda; }
  std::string bf16_path() const override { return "cuda (fp32 chains in vdpbf16ps order)"; }

  // Large buffers (a pass's rows, activations, gradients: what GPU calls copy in and out) in
  // pinned host memory, through a cache as the CPU backend's (cudaMallocHost is slow); small ones
  // the host's.
  void* allocate(std::size_t bytes) override {
    if (bytes < kPinnedFrom) return host_.allocate(bytes);
    state();  // (this thread's device current: the pinned block belongs to its context)
    void* data = pinned_blocks_.allocate(bytes);
    std::lock_guard lock(pinned_mutex_);
    pinned_.insert(data);
    return data;
  }
  void deallocate(void* data) override {
    {
      std::lock_guard lock(pinned_mutex_);
      if (pinned_.erase(data) == 0) return host_.deallocate(data);
    }
    pinned_blocks_.deallocate(data);
  }

  // The GEMM kernel alone on operands already in device memory (cuda_gemm_kernel_alone).
  std::function<void()> kernel_alone(Precision precision, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K) {
    struct Operands {
      DeviceBuffer a, b, c;
      cuda::GemmCall call;
    };
    auto ops = std::make_shared<Operands>();
    ThreadState& t = state();
    const std::vector<float> halves(std::max<int64_t>({M * K, K * N, M * N, 1}), 0.5f);
    for (auto [to, n] : {std::pair{&ops->a, M * K}, {&ops->b, K * N}, {&ops->c, M * N}})
      upload(halves.data(), 1, std::max<int64_t>(1, n), std::max<int64_t>(1, n), sizeof(float), *to, t.stream);
    finish(t);
    cuda::GemmCall& g = ops->call;
    g.M = M, g.N = N, g.K = K, g.bf16 = precision == Precision::bf16;
    g.trans_a = ta == Trans::yes, g.trans_b = tb == Trans::yes;
    g.a = ops->a.as<float>(), g.lda = g.trans_a ? M : K;
    g.b = ops->b.as<float>(), g.ldb = g.trans_b ? K : N;
    g.c = ops->c.as<float>(), g.ldc = N;
    return [this, ops] {
      ThreadState& ts = state();
      launch(ops->call, ts.stream);
      finish(ts);
    };
  }

  // ---- on the GPU (the rest of the table: ForwardingBackend, the host's) -------------------------
  void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
            int64_t ldb, float beta, float* C, int64_t ldc) override {
    run_gemm(false, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, RowsIn A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) override {
    run_gemm(true, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  std::unique_ptr<PackedMatrix> pack_matrix(Precision precision, Trans trans_b, int64_t K, int64_t N, const float* B,
                                            int64_t ldb) override {
    ThreadState& t = state();
    auto packed = std::make_unique<CudaPackedMatrix>();
    packed->precision = precision;
    packed->trans_b = trans_b;
    packed->K = K;
    packed->N = N;
    if (trans_b == Trans::yes)
      upload(B, N, K, ldb, sizeof(float), packed->b, t.stream);
    else
      upload(B, K, N, ldb, sizeof(float), packed->b, t.stream);
    finish(t);
    return packed;
  }
  void gemm_prepacked(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedMatrix& packed, float beta,
                      float* C, int64_t ldc) override {
    const auto& p = static_cast<const CudaPackedMatrix&>(packed);
    ThreadState& t = state();
    cuda::GemmCall g = start_call(t, p.precision == Precision::bf16, trans_a, M, p.N, p.K, A, lda, beta, C, ldc);
    g.trans_b = p.trans_b == Trans::yes;
    g.b = p.b.as<float>();
    g.ldb = g.trans_b ? p.K : p.N;
    end_call(t, g, C, ldc);
  }

  std::unique_ptr<PackedExpert> new_packed_expert(Activation activation, Precision precision) override {
    auto packed = std::make_unique<CudaPackedExpert>();
    packed->activation = activation;
    packed->precision = precision;
    return packed;
  }
  void pack_expert_forward(PackedExpert& packed, const float* w1, const float* w2, const float* b1, const float* b2,
                           int64_t M, int64_t H) override {
    auto& p = static_cast<CudaPackedExpert&>(packed);
    upload_weights(p, w1, w2, M, H);
    p.b1 = b1;
    p.b2 = b2;
  }
  void pack_expert_backward(PackedExpert& packed, const float* w1, const float* w2, int64_t M, int64_t H) override {
    upload_weights(static_cast<CudaPackedExpert&>(packed), w1, w2, M, H);
  }

  void expert_forward(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                      RowsOut act, OutputRows y, ForwardFor use) override {
    const auto& p = static_cast<const CudaPackedExpert&>(packed);
    if (rows == 0) return;
    PM_CHECK((u.bf16 == nullptr && act.bf16 == nullptr) || p.precision == Precision::bf16,
             "bf16 rows of an expert's input or activation need a bf16 expert");
    const bool bf16 = p.precision == Precision::bf16;
    const int64_t H1 = fc1_width(p.activation, H);
    ThreadState& t = state();
    // the biases are read now (the caller may change them between packing and running)
    if (p.b1) upload(p.b1, 1, H1, H1, sizeof(float), p.b1_dev, t.stream);
    if (p.b2) upload(p.b2, 1, M, M, sizeof(float), p.b2_dev, t.stream);
    // hpre [rows, H1] = u W1 + b1 (in t.c)
    cuda::GemmCall fc1;
    fc1.M = rows, fc1.N = H1, fc1.K = M, fc1.bf16 = bf16;
    if (u.bf16) {  // the rows gathered as they are staged
      upload_rows(std::vector<const uint16_t*>(u.bf16, u.bf16 + rows), M, t.host_a16, t.a, t.stream);
      fc1.a_bf16 = t.a.as<uint16_t>();
    } else {
      upload_rows(std::vector<const float*>(u.f32, u.f32 + rows), M, t.host_a, t.a, t.stream);
      fc1.a = t.a.as<float>();
    }
    fc1.lda = M;
    fc1.b = p.w1.as<float>(), fc1.ldb = H1, fc1.bias = p.b1 ? p.b1_dev.as<float>() : nullptr;
    fc1.c = static_cast<float*>(t.c.reserve(rows * H1 * sizeof(float))), fc1.ldc = H1;
    launch(fc1, t.stream);
    // act [rows, H] (in t.d: floats, or bf16 bits)
    t.d.reserve(rows * H * sizeof(float));
    float* act_f = act.bf16 ? nullptr : t.d.as<float>();
    uint16_t* act_h = act.bf16 ? t.d.as<uint16_t>() : nullptr;
    if (p.activation == Activation::swiglu)
      cuda::swiglu_forward(fc1.c, act_f, act_h, rows, H, t.stream);
    else
      cuda::gelu_forward(fc1.c, act_f, act_h, rows * H, use == ForwardFor::backward, t.stream);
    check(cudaGetLastError(), "activation kernel");
    // y [rows, M] = act W2 + b2 (in t.e); y null: the activation only (a backward's recompute)
    cuda::GemmCall fc2;
    fc2.M = rows, fc2.N = M, fc2.K = H, fc2.bf16 = bf16, fc2.a = act_f, fc2.a_bf16 = act_h, fc2.lda = H;
    fc2.b = p.w2.as<float>(), fc2.ldb = M, fc2.bias = p.b2 ? p.b2_dev.as<float>() : nullptr;
    fc2.c = static_cast<float*>(t.e.reserve(rows * M * sizeof(float))), fc2.ldc = M;
    if (y) launch(fc2, t.stream);
    // GeLU's saved values are its derivative (written over hpre), SwiGLU's the pre-activation;
    // an inference pass reads none of them (backend.h leaves `saved` unspecified there)
    if (use == ForwardFor::backward) download(fc1.c, rows, H1, saved, H1, sizeof(float), t.stream);
    if (act.bf16)
      download(act_h, rows, H, act.bf16, H, sizeof(uint16_t), t.stream);
    else
      download(act_f, rows, H, act.f32, H, sizeof(float), t.stream);
    if (y)
      download_out(t, fc2.c, rows, M, y);
    else
      finish(t);
  }

  void expert_backward_input(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, DyRows dy,
                             const float* const* saved_rows, float* dhpre, OutputRows du) override {
    const auto& p = static_cast<const CudaPackedExpert&>(packed);
    if (rows == 0) return;
    const bool bf16 = p.precision == Precision::bf16;
    const int64_t H1 = fc1_width(p.activation, H);
    ThreadState& t = state();
    PM_CHECK(dy.block.bf16 == nullptr || bf16, "bf16 rows of dy need a bf16 expert");
    std::vector<float> dy_scaled;  // scaled rows made on the host, the values the CPU's experts read
    if (dy.rows) scale_rows(dy.rows, dy.scale, rows, M, bf16, dy_scaled);
    cuda::GemmCall fc2;
    upload_a(t, dy.rows ? RowsIn(dy_scaled.data()) : dy.block, rows, M, M, fc2);
    upload_rows(std::vector<const float*>(saved_rows, saved_rows + rows), H1, t.host_b, t.b, t.stream);
    float* dh = static_cast<float*>(t.c.reserve(rows * H1 * sizeof(float)));
    // dact = dy W2^T: GeLU's into dhpre, SwiGLU's into the second half of each dhpre row
    fc2.M = rows, fc2.N = H, fc2.K = M, fc2.bf16 = bf16;
    fc2.trans_b = true, fc2.b = p.w2.as<float>(), fc2.ldb = M;
    fc2.c = p.activation == Activation::swiglu ? dh + H : dh, fc2.ldc = H1;
    launch(fc2, t.stream);
    if (p.activation == Activation::swiglu)
      cuda::swiglu_backward(t.b.as<float>(), dh + H, H1, dh, rows, H, t.stream);
    else
      cuda::gelu_backward_by_saved_grad(t.b.as<float>(), dh, dh, rows * H, t.stream);
    check(cudaGetLastError(), "activation kernel");
    // du = dhpre W1^T
    cuda::GemmCall fc1;
    fc1.M = rows, fc1.N = M, fc1.K = H1, fc1.bf16 = bf16, fc1.a = dh, fc1.lda = H1;
    fc1.trans_b = true, fc1.b = p.w1.as<float>(), fc1.ldb = H1;
    fc1.c = static_cast<float*>(t.e.reserve(rows * M * sizeof(float))), fc1.ldc = M;
    launch(fc1, t.stream);
    download(dh, rows, H1, dhpre, H1, sizeof(float), t.stream);
    download_out(t, fc1.c, rows, M, du);
  }

  void expert_weight_grads(const ExpertGrads& g, Activation activation, Precision precision, int64_t M, int64_t H,
                           const ExpertRows& r) override {
    const int64_t rows = static_cast<int64_t>(r.rows());
    r.check(precision);
    if (rows == 0) return;
    // bf16 rows of dy widened here (exact): the kernels read B as floats
    std::vector<float> dy_widened(r.dy_bf16.size() * M), dy_scaled;
    std::vector<const float*> dy = r.dy;
    if (!r.dy_scale.empty()) {  // scaled rows made on the host (DyRows)
      scale_rows(r.dy.data(), r.dy_scale.data(), rows, M, precision == Precision::bf16, dy_scaled);
      for (int64_t i = 0; i < rows; ++i) dy[i] = &dy_scaled[i * M];
    }
    for (size_t i = 0; i < r.dy_bf16.size(); ++i) {
      bf16_to_floats(r.dy_bf16[i], &dy_widened[i * M], M);
      dy.push_back(&dy_widened[i * M]);
    }
    const int64_t H1 = fc1_width(activation, H);
    ThreadState& t = state();
    // grad [m, n] += a^T b over the rows in order (a [rows, m] floats or bf16, b [rows, n])
    auto tn_rows = [&](int64_t m, int64_t n, const std::vector<const float*>& a, const std::vector<const uint16_t*>& a16,
                       const std::vector<const float*>& b, float* grad) {
      cuda::GemmCall call;
      call.M = m, call.N = n, call.K = rows, call.trans_a = true, call.bf16 = precision == Precision::bf16;
      if (!a16.empty()) {
        upload_rows(a16, m, t.host_a16, t.a, t.stream);
        call.a_bf16 = t.a.as<uint16_t>();
      } else {
        upload_rows(a, m, t.host_a, t.a, t.stream);
        call.a = t.a.as<float>();
      }
      call.lda = m;
      upload_rows(b, n, t.host_b, t.b, t.stream);
      call.b = t.b.as<float>(), call.ldb = n;
      upload(grad, m, n, n, sizeof(float), t.c, t.stream);
      call.beta = 1.0f, call.c = t.c.as<float>(), call.ldc = n;
      launch(call, t.stream);
      download(call.c, m, n, grad, n, sizeof(float), t.stream);
      finish(t);
    };
    tn_rows(H, M, r.act, r.act_bf16, dy, g.w2);
    for (const float* row : dy) host_.add_column_sums(row, 1, M, g.b2);
    tn_rows(M, H1, r.u, r.u_bf16, r.dhpre, g.w1);
    for (const float* row : r.dhpre) host_.add_column_sums(row, 1, H1, g.b1);
  }

 private:
  ThreadState& state() {
    thread_local ThreadState t;
    if (t.device != device_) {
      check(cudaSetDevice(device_), "cudaSetDevice");
      if (!t.stream) check(cudaStreamCreateWithFlags(&t.stream, cudaStreamNonBlocking), "cudaStreamCreate");
      t.device = device_;
    }
    return t;
  }
  static void launch(const cuda::GemmCall& g, cudaStream_t stream) {
    cuda::gemm(g, stream);
    check(cudaGetLastError(), "GEMM kernel");
  }
  // Waits for the stream: the results are in host memory when a call returns.
  static void finish(ThreadState& t) { check(cudaStreamSynchronize(t.stream), "cudaStreamSynchronize"); }

  // The device's rows [rows, width] out to `out`, then the stream finished: into its block, or
  // through pinned staging to each row's pointer.
  static void download_out(ThreadState& t, const float* device, int64_t rows, int64_t width, OutputRows out) {
    if (out.block) {
      download(device, rows, width, out.block, width, sizeof(float), t.stream);
      return finish(t);
    }
    auto* staged = static_cast<float*>(t.host_out.reserve(std::max<int64_t>(1, rows * width) * sizeof(float)));
    download(device, rows, width, staged, width, sizeof(float), t.stream);
    finish(t);
    for (int64_t i = 0; i < rows; ++i)
      if (out.rows16)
        floats_to_bf16(staged + i * width, out.rows16[i], width);
      else
        std::memcpy(out.rows[i], staged + i * width, width * sizeof(float));
  }

  // A's storage [rows, cols] (floats or bf16 rows, ld apart) into t.a, and g's A pointing at it.
  // out[i] = scale[i] * rows[i], n rows of `width`: what DyRows::scaled means, one float product a
  // value, rounded to bf16 for a bf16 expert (the values the bias gradient sums, as on the CPU)
  static void scale_rows(const float* const* rows, const float* scale, int64_t n, int64_t width, bool bf16,
                         std::vector<float>& out) {
    out.resize(n * width);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < width; ++j) {
        const float v = scale[i] * rows[i][j];
        out[i * width + j] = bf16 ? round_to_bf16(v) : v;
      }
  }
  static void upload_a(ThreadState& t, RowsIn A, int64_t rows, int64_t cols, int64_t ld, cuda::GemmCall& g) {
    if (A.bf16) {
      upload(A.bf16, rows, cols, ld, sizeof(uint16_t), t.a, t.stream);
      g.a_bf16 = t.a.as<uint16_t>();
    } else {
      upload(A.f32, rows, cols, ld, sizeof(float), t.a, t.stream);
      g.a = t.a.as<float>();
    }
    g.lda = cols;
  }
  // A GEMM's A (floats or bf16 rows) and C copied in; B is the caller's to set.
  cuda::GemmCall start_call(ThreadState& t, bool bf16, Trans ta, int64_t M, int64_t N, int64_t K, RowsIn A,
                            int64_t lda, float beta, float* C, int64_t ldc) {
    cuda::GemmCall g;
    g.M = M, g.N = N, g.K = K, g.bf16 = bf16, g.trans_a = ta == Trans::yes, g.beta = beta;
    upload_a(t, A, g.trans_a ? K : M, g.trans_a ? M : K, lda, g);
    t.c.reserve(std::max<int64_t>(1, M * N) * sizeof(float));
    if (beta != 0.0f) upload(C, M, N, ldc, sizeof(float), t.c, t.stream);
    g.c = t.c.as<float>(), g.ldc = N;
    return g;
  }
  void end_call(ThreadState& t, const cuda::GemmCall& g, float* C, int64_t ldc) {
    launch(g, t.stream);
    download(g.c, g.M, g.N, C, ldc, sizeof(float), t.stream);
    finish(t);
  }
  void run_gemm(bool bf16, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, RowsIn A, int64_t lda, const float* B,
                int64_t ldb, float beta, float* C, int64_t ldc) {
    PM_CHECK(beta == 0.0f || beta == 1.0f, "gemm supports beta 0 or 1, got {}", beta);
    if (M == 0 || N == 0) return;
    ThreadState& t = state();
    cuda::GemmCall g = start_call(t, bf16, ta, M, N, K, A, lda, beta, C, ldc);
    g.trans_b = tb == Trans::yes;
    if (g.trans_b)
      upload(B, N, K, ldb, sizeof(float), t.b, t.stream);
    else
      upload(B, K, N, ldb, sizeof(float), t.b, t.stream);
    g.b = t.b.as<float>(), g.ldb = g.trans_b ? K : N;
    end_call(t, g, C, ldc);
  }
  void upload_weights(CudaPackedExpert& p, const float* w1, const float* w2, int64_t M, int64_t H) {
    ThreadState& t = state();
    const int64_t H1 = fc1_width(p.activation, H);
    p.M = M, p.H = H;
    upload(w1, M, H1, H1, sizeof(float), p.w1, t.stream);
    upload(w2, H, M, M, sizeof(float), p.w2, t.stream);
    finish(t);
  }

  int device_;
  std::string gpu_;
  static constexpr std::size_t kPinnedFrom = std::size_t{1} << 20;
  // never destroyed (as the CPU backend's cache): freeing pinned memory after the CUDA runtime's
  // own teardown at exit would fail
  BlockCache& pinned_blocks_ = *new BlockCache(
      [](std::size_t bytes) {
        void* p = nullptr;
        if (cudaMallocHost(&p, bytes) != cudaSuccess) throw std::bad_alloc();
        return p;
      },
      [](void* p) { cudaFreeHost(p); }, kPinnedFrom);
  std::mutex pinned_mutex_;
  std::unordered_set<void*> pinned_;  // the blocks handed out from pinned_blocks_
};

}  // namespace

std::function<void()> cuda_gemm_kernel_alone(Precision precision, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K) {
  return static_cast<CudaBackend&>(cuda_backend()).kernel_alone(precision, ta, tb, M, N, K);
}

bool cuda_available(std::string* why_not) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    if (why_not)
      *why_not = status != cudaSuccess ? std::string("no usable GPU (") + cudaGetErrorString(status) + ")"
                                       : std::string("no GPU on this machine");
    return false;
  }
  return true;
}

Backend& cuda_backend() {
  static std::once_flag once;
  static std::unique_ptr<CudaBackend> backend;
  static std::string why;
  std::call_once(once, [] {
    int devices = 0;
    if (cuda_available(&why) && cudaGetDeviceCount(&devices) == cudaSuccess)
      backend = std::make_unique<CudaBackend>(gpu_for_rank(devices, 0));  // one GPU each in turn
  });
  if (!backend) throw Error(ErrorKind::usage, "the CUDA backend cannot run here: " + why);
  return *backend;
}

}  // namespace pm

#else  // built without CUDA

namespace pm {

bool cuda_available(std::string* why_not) {
  if (why_not) *why_not = "this build has no CUDA backend (CMake did not find nvcc; see PIPEMOE_CUDA)";
  return false;
}

Backend& cuda_backend() {
  std::string why;
  cuda_available(&why);
  throw Error(ErrorKind::usage, "the CUDA backend cannot run here: " + why);
}

std::function<void()> cuda_gemm_kernel_alone(Precision, Trans, Trans, int64_t, int64_t, int64_t) {
  cuda_backend();  // (throws)
  return {};
}

}  // namespace pm

#endif
