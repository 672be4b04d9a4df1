// One GEMM build's side of bench/gemm_ab.sh: compiled once per side with -Dpm=<namespace> and
// -DGEMM_AB_RUN=<function>, so that two versions of the GEMM live in one process.
// GEMM_AB_RUN(shape) times one call of the expert shape `shape` (the layer's, 1025 rows per
// expert, M 512, H 1024, or GEMM_AB_SHAPE's: dims.h) and returns its seconds; shape 6 is the
// 2048^3 product. The bits of the product it wrote go to *hash (FNV-1a), so the two sides can be
// compared bit for bit.
// GEMM_AB_DTYPE=bf16 (environment): the same shapes as the layer's bf16 GEMMs (B packed by
// pack_b_bf16; A's rows stored in bf16 where a bf16 expert keeps them: u, the activations and the
// output gradients dy, which arrive in bf16; dh stays float).
// GEMM_AB_ORDER=amx with it: the bf16 GEMMs in AMX's order (both sides need a revision that has it).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "dims.h"

using namespace pm;

extern "C" double GEMM_AB_RUN(int shape, uint64_t* hash) {
  static const GemmAbDims dims = gemm_ab_dims();
  static const int64_t R = dims.R, M = dims.M, H = dims.H;
  constexpr int64_t S = 2048;
  static std::vector<float> u(R * M), a(R * H), dy(R * M), dh(R * H), w1(M * H), w2(H * M), gw(H * M);
  static std::vector<float> out(R * std::max(M, H));  // [R, H] or [R, M]: either product's C
  static std::vector<const float*> a_rows(R), dy_rows(R), u_rows(R), dh_rows(R);
  static std::vector<float> sa, sb, sc;
  static std::vector<uint16_t> a16(R * H), u16(R * M), dy16(R * M);
  static std::vector<const uint16_t*> a16_rows(R), u16_rows(R);
  static PackedB pw1, pw2, pw2t, pw1t, psq;
  static const bool bf16 = std::getenv("GEMM_AB_DTYPE") && std::string(std::getenv("GEMM_AB_DTYPE")) == "bf16";
  static bool ready = false;
  if (!ready) {  // the same values on both sides: the results can be compared bit for bit
    ready = true;
#ifdef PM_HAVE_BF16_ORDER
    if (std::getenv("GEMM_AB_ORDER") && std::string(std::getenv("GEMM_AB_ORDER")) == "amx") set_bf16_order(Bf16Order::amx);
#endif
    for (size_t i = 0; i < u.size(); ++i) u[i] = dy[i] = static_cast<float>(i % 7) * 0.1f - 0.3f;
    for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 5) * 0.1f, dh[i] = static_cast<float>(i % 3) * 0.1f;
    for (size_t i = 0; i < w1.size(); ++i) w1[i] = static_cast<float>(i % 11) * 0.01f, w2[i] = static_cast<float>(i % 13) * 0.01f;
    auto pack = bf16 ? pack_b_bf16 : pack_b;
    pack(Trans::no, M, H, w1.data(), H, pw1);
    pack(Trans::no, H, M, w2.data(), M, pw2);
    pack(Trans::yes, M, H, w2.data(), M, pw2t);
    pack(Trans::yes, H, M, w1.data(), H, pw1t);
    for (int64_t i = 0; i < R; ++i)
      a_rows[i] = &a[i * H], dy_rows[i] = &dy[i * M], u_rows[i] = &u[i * M], dh_rows[i] = &dh[i * H];
    for (size_t i = 0; i < a.size(); ++i) a16[i] = static_cast<uint16_t>((static_cast<uint32_t>(i % 5) + 0x3f00) & 0xffff);
    for (size_t i = 0; i < u.size(); ++i) u16[i] = static_cast<uint16_t>(0x3e00 + i % 7), dy16[i] = u16[i] ^ 0x8000;
    for (int64_t i = 0; i < R; ++i) a16_rows[i] = &a16[i * H], u16_rows[i] = &u16[i * M];
    sa.assign(S * S, 0.5f), sb.assign(S * S, 0.25f), sc.assign(S * S, 0.0f);
    pack(Trans::no, S, S, sb.data(), S, psq);
  }
  // out = A op(B), A's rows in bf16 where a bf16 expert keeps them
  auto nn = [](const float* a32, const uint16_t* a16, int64_t lda, const PackedB& b, int64_t n) {
    if (bf16)
      gemm_packed(Trans::no, R, a16, lda, b, 0.0f, out.data(), n);
    else
      gemm_packed(Trans::no, R, a32, lda, b, 0.0f, out.data(), n);
  };
  const auto start = std::chrono::steady_clock::now();
  switch (shape) {
    case 0: nn(u.data(), u16.data(), M, pw1, H); break;
    case 1: nn(a.data(), a16.data(), H, pw2, M); break;
    case 2: nn(dy.data(), dy16.data(), M, pw2t, H); break;
    case 3: gemm_packed(Trans::no, R, dh.data(), H, pw1t, 0.0f, out.data(), M); break;
    case 4:
      if (bf16)
        gemm_tn_rows_bf16(H, M, R, a16_rows.data(), dy_rows.data(), 0.0f, gw.data(), M);
      else
        gemm_tn_rows(H, M, R, a_rows.data(), dy_rows.data(), 0.0f, gw.data(), M);
      break;
    case 5:
      if (bf16)
        gemm_tn_rows_bf16(M, H, R, u16_rows.data(), dh_rows.data(), 0.0f, gw.data(), H);
      else
        gemm_tn_rows(M, H, R, u_rows.data(), dh_rows.data(), 0.0f, gw.data(), H);
      break;
    default: gemm_packed(Trans::no, S, sa.data(), S, psq, 0.0f, sc.data(), S); break;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::vector<float>& c = shape == 6 ? sc : shape >= 4 ? gw : out;
  const size_t n = shape == 6 ? c.size() : shape >= 4 ? gw.size() : static_cast<size_t>(R * (shape % 2 ? M : H));
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &c[i], sizeof bits);
    h = (h ^ bits) * 1099511628211ull;
  }
  *hash = h;
  return seconds;
}
