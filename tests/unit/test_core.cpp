// Tensor views, bf16 conversion, .npy round trips and errors, RNG streams.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/aligned.h"
#include "core/bf16_lanes.h"
#include "core/block_cache.h"
#include "core/error.h"
#include "core/npy.h"
#include "core/round_medians.h"
#include "core/rng.h"
#include "core/shard.h"
#include "core/tensor.h"

namespace pm {
namespace {

// The block cache hands a freed large block back out for a request of about its size, sends small
// ones straight to the system, and never keeps more cached than was ever live at once.
TEST(BlockCache, ReusesLargeBlocksAndStaysWithinThePeak) {
  std::set<void*> system;  // blocks the "system" handed out and has not had back
  long system_allocations = 0;
  std::mutex system_mutex;  // the cache calls the system outside its own lock
  {
    BlockCache cache(
        [&](std::size_t bytes) {
          std::lock_guard<std::mutex> lock(system_mutex);
          void* p = std::malloc(bytes);
          system.insert(p);
          ++system_allocations;
          return p;
        },
        [&](void* p) {
          std::lock_guard<std::mutex> lock(system_mutex);
          ASSERT_EQ(system.erase(p), 1u) << "freed a block the system did not hand out";
          std::free(p);
        },
        /*min_bytes=*/1000, /*granule=*/1024);
    void* a = cache.allocate(5000);  // rounded to 5120
    cache.deallocate(a);
    EXPECT_EQ(cache.allocate(4900), a) << "the same rounded size: the cached block";
    void* small = cache.allocate(100);
    cache.deallocate(small);  // not cached: back to the system at once
    EXPECT_EQ(system.count(small), 0u);
    void* b = cache.allocate(9000);  // 9216: a5120 is live, so a new block
    EXPECT_NE(b, a);
    cache.deallocate(b);
    void* c = cache.allocate(3000);  // 3072: the cached 9216 is more than 1/4 too big
    EXPECT_NE(c, b);
    EXPECT_EQ(cache.stats().hits, 1);
    // cached bytes never exceed the most that was live at once (5120 + 9216 here)
    cache.deallocate(a);
    cache.deallocate(c);
    const BlockCache::Stats s = cache.stats();
    EXPECT_EQ(s.live_bytes, 0u);
    EXPECT_LE(s.cached_bytes, s.peak_live_bytes);
    EXPECT_EQ(s.peak_live_bytes, 5120u + 9216u);
    // many threads at once: every block is someone's alone
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&cache, t] {
        for (int i = 0; i < 200; ++i) {
          auto* p = static_cast<unsigned char*>(cache.allocate(2048 + 1024 * ((t + i) % 3)));
          std::memset(p, t, 2048);
          for (int k = 0; k < 2048; k += 97) ASSERT_EQ(p[k], t);
          cache.deallocate(p);
        }
      });
    for (std::thread& t : threads) t.join();
  }
  EXPECT_TRUE(system.empty()) << "the cache's destructor gives every cached block back";
  EXPECT_GT(system_allocations, 3);
}

// Whether the mapping that holds `p` may be backed by transparent huge pages
// (/proc/self/smaps' THPeligible), or -1 where the kernel does not say.
int thp_eligible(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(p);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 && line.find(':') > line.find(' ')) {
      inside = begin <= at && at < end;
    } else if (inside && line.rfind("THPeligible:", 0) == 0) {
      return std::atoi(line.c_str() + 12);
    }
  }
  return -1;
}

// Small blocks come aligned to a cache line; blocks of 2 MB and more to 2 MB, whole, and marked
// for transparent huge pages where the kernel offers them to the programs that ask (madvise).
TEST(AllocateAligned, LargeBlocksStartOnAHugePageAndAskForThem) {
  for (std::size_t bytes : {std::size_t{0}, std::size_t{100}, std::size_t{3} << 20, (std::size_t{5} << 20) + 12}) {
    auto* p = static_cast<unsigned char*>(allocate_aligned(bytes));
    ASSERT_NE(p, nullptr);
    const std::size_t alignment = bytes >= (std::size_t{2} << 20) ? std::size_t{2} << 20 : 64;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % alignment, 0u) << bytes << " bytes";
    std::memset(p, 0x5a, bytes);  // every byte asked for is there to write
    if (bytes >= (std::size_t{2} << 20)) {
      std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
      std::string modes;
      std::getline(mode, modes);
      const bool offered = modes.find("[always]") != std::string::npos || modes.find("[madvise]") != std::string::npos;
      const int eligible = thp_eligible(p);
      if (offered && eligible >= 0 && huge_pages_wanted()) {
        EXPECT_EQ(eligible, 1) << "THP '" << modes << "', " << bytes << " bytes";
      }
    }
    std::free(p);
  }
}

// Zeros of 2 MB and more come from the kernel's zero pages: zero, 2 MB aligned, writable to the
// last byte, and not backed by memory until written (a model's gradients that inference never
// writes). Below 2 MB, ordinary zeroed memory.
TEST(Tensor, LargeZerosAreUntouchedZeroPagesUntilWritten) {
  auto resident_kb = [] {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
      if (line.rfind("RssAnon:", 0) == 0) return std::atol(line.c_str() + 8);
    return -1L;
  };
  for (int64_t floats : {int64_t{100}, int64_t{3} << 18, (int64_t{5} << 18) + 3}) {
    Tensor t = Tensor::zeros({floats});
    const float* values = static_cast<const float*>(t.raw());
    if (t.nbytes() >= kZeroPagesFrom) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(values) % kZeroPagesFrom, 0u);
    }
    for (int64_t i = 0; i < floats; ++i) ASSERT_EQ(values[i], 0.0f) << floats << " floats, at " << i;
    t.f32()[floats - 1] = 7.0f;  // the last byte is there to write
    EXPECT_EQ(t.clone().f32()[floats - 1], 7.0f);
  }
  // 64 MB of zeros, read but never written: still not resident (the reads map the shared zero page)
  const long before = resident_kb();
  Tensor big = Tensor::zeros({int64_t{16} << 20});
  EXPECT_EQ(static_cast<const float*>(big.raw())[(int64_t{16} << 20) - 1], 0.0f);
  if (before >= 0) {
    EXPECT_LT(resident_kb() - before, 16 << 10) << "KB resident after reading 64 MB of zeros";
  }
}

TEST(Tensor, ViewsShareMemory) {
  Tensor t = Tensor::zeros({4, 3});
  Tensor rows = t.rows(1, 3);
  rows.f32()[0] = 5;
  EXPECT_EQ(t.f32()[3], 5);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(t.reshape({12}).numel(), 12);
  EXPECT_THROW(t.reshape({5}), Error);
  EXPECT_THROW(t.data<double>(), Error);
  Tensor c = t.clone();
  c.f32()[3] = 1;
  EXPECT_EQ(t.f32()[3], 5);
}

TEST(Tensor, EveryMutableAccessIsANewVersionSharedByViewsAndCopies) {
  Tensor t = Tensor::zeros({4, 3}), other = Tensor::zeros({4, 3});
  EXPECT_NE(t.version(), 0u);
  EXPECT_NE(t.version(), other.version()) << "two tensors never show the same version";
  const uint64_t v0 = t.version();
  (void)std::as_const(t).f32();
  (void)std::as_const(t).raw();
  EXPECT_EQ(t.version(), v0) << "reading is no change";
  Tensor copy = t, rows = t.rows(1, 3);
  rows.f32()[0] = 1;
  EXPECT_GT(t.version(), v0);
  EXPECT_EQ(copy.version(), t.version());
  for (auto change : std::initializer_list<std::function<void(Tensor&)>>{
           [](Tensor& x) { x.zero(); }, [](Tensor& x) { x.fill(2); }, [](Tensor& x) { x.raw(); },
           [](Tensor& x) { x.data<float>(); }, [](Tensor& x) { x.mark_changed(); }}) {
    const uint64_t v = t.version();
    change(t);
    EXPECT_GT(t.version(), v);
  }
  float caller[4];
  EXPECT_EQ(Tensor::view_of(caller, {4}).version(), 0u) << "caller memory: untracked";
  EXPECT_EQ(t.clone().version() == t.version(), false);
}

TEST(VersionStamp, SaysChangedTheFirstTimeAfterEveryChangeAndForUntrackedMemory) {
  Tensor a = Tensor::zeros({3}), b = Tensor::zeros({3});
  VersionStamp stamp;
  EXPECT_TRUE(stamp.changed({&a, &b}));
  EXPECT_FALSE(stamp.changed({&a, &b}));
  b.f32()[1] = 1;
  EXPECT_TRUE(stamp.changed({&a, &b}));
  EXPECT_FALSE(stamp.changed({&a, &b}));
  EXPECT_TRUE(stamp.changed({&a})) << "another list";
  Tensor c = Tensor::zeros({3});
  EXPECT_TRUE(stamp.changed({&c})) << "another tensor";
  float caller[3];
  Tensor view = Tensor::view_of(caller, {3});
  EXPECT_TRUE(stamp.changed({&view}));
  EXPECT_TRUE(stamp.changed({&view}));
  stamp.clear();
  EXPECT_TRUE(stamp.changed({&c}));
}

TEST(Tensor, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(float_to_bf16(1.00390625f), 0x3f80);  // exactly halfway: round to even (down)
  EXPECT_EQ(float_to_bf16(1.01171875f), 0x3f82);  // halfway: round to even (up)
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  Tensor t = Tensor::empty({3});
  t.f32()[0] = 3.14159f, t.f32()[1] = -2.5f, t.f32()[2] = 1e-3f;
  Tensor back = t.to(DType::bf16).to(DType::f32);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(back.f32()[i], t.f32()[i], std::abs(t.f32()[i]) / 128);
}

// Rows rounded 16 at a time, plain or scaled first (core/bf16_lanes.h: vcvtneps2bf16 where the
// build has AVX512_BF16, the integer rounding for a vector with a NaN or a denormal), give
// float_to_bf16's bits for every value: random bit patterns (every exponent, so NaNs, infinities and
// denormals among them), halfway cases, values that round up to infinity, and vectors of normal
// values only (the instruction's path).
TEST(Tensor, Bfloat16RowsRoundAsEachValueDoes) {
  Rng rng(2026, 12);
  std::vector<uint32_t> bits(16 * 4096);
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint32_t r = static_cast<uint32_t>(rng.next_u64() >> 32);
    // the first half: any pattern; the second: normal values only
    bits[i] = i < bits.size() / 2 ? r : (r & 0x807fffffu) | ((1u + r % 254u) << 23);
  }
  const uint32_t special[] = {0x00000001u, 0x807fffffu, 0x7f800001u, 0xffc12345u, 0x7fbfffffu, 0x7f800000u,
                              0xff800000u, 0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x7f7fffffu,
                              0x7f7f8000u, 0x00800000u, 0x0080ffffu, 0x33333333u};
  std::copy(std::begin(special), std::end(special), bits.begin());  // one vector of them
  bits.push_back(0x3f808000u);  // a tail past the last whole vector
  std::vector<float> values(bits.size());
  std::memcpy(values.data(), bits.data(), bits.size() * 4);
  std::vector<uint16_t> row(values.size());
  floats_to_bf16(values.data(), row.data(), static_cast<int64_t>(values.size()));
  int wrong = 0;
  for (size_t i = 0; i < values.size(); ++i) wrong += row[i] != float_to_bf16(values[i]);
  EXPECT_EQ(wrong, 0);
  // scaled first (a gate value times an output gradient): the bits of the float product, rounded
  for (float scale : {0.3f, -1.7f, 1e-30f}) {
    scaled_floats_to_bf16(scale, values.data(), row.data(), static_cast<int64_t>(values.size()));
    wrong = 0;
    for (size_t i = 0; i < values.size(); ++i) wrong += row[i] != float_to_bf16(scale * values[i]);
    EXPECT_EQ(wrong, 0) << "scale " << scale;
  }
#if defined(__AVX512BW__)
  // the GEMM's pair words: even's bf16 low, odd's high
  for (size_t v = 0; v + 32 <= values.size(); v += 32) {
    uint32_t words[16];
    _mm512_storeu_si512(words, pair_words16(_mm512_loadu_ps(&values[v]), _mm512_loadu_ps(&values[v + 16])));
    for (int j = 0; j < 16; ++j)
      ASSERT_EQ(words[j], float_to_bf16(values[v + j]) | (uint32_t{float_to_bf16(values[v + 16 + j])} << 16))
          << "vector at " << v << ", lane " << j;
  }
#endif
}

TEST(Npy, RoundTripsEveryDtypeAndRejectsCorruptFiles) {
  auto dir = std::filesystem::temp_directory_path() / "pipemoe_test_npy";
  std::filesystem::create_directories(dir);
  Tensor f = Tensor::empty({2, 3});
  for (int i = 0; i < 6; ++i) f.f32()[i] = 0.5f * i;
  write_npy((dir / "f.npy").string(), f);
  Tensor g = read_npy((dir / "f.npy").string());
  EXPECT_EQ(g.shape(), f.shape());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(g.f32()[i], f.f32()[i]);
  Tensor v = Tensor::zeros({5}, DType::i64);
  v.data<int64_t>()[4] = 1234567890123;
  write_npy((dir / "v.npy").string(), v);
  EXPECT_EQ(read_npy((dir / "v.npy").string()).data<int64_t>()[4], 1234567890123);
  Tensor s = Tensor::zeros({1});
  write_npy((dir / "s.npy").string(), s);
  EXPECT_EQ(read_npy((dir / "s.npy").string()).shape(), (Shape{1}));

  std::ofstream((dir / "bad.npy").string()) << "not numpy";
  EXPECT_THROW(read_npy((dir / "bad.npy").string()), Error);
  EXPECT_THROW(read_npy((dir / "missing.npy").string()), Error);
  std::filesystem::resize_file(dir / "f.npy", 100);  // header intact, data cut short
  EXPECT_THROW(read_npy((dir / "f.npy").string()), Error);
  std::filesystem::remove_all(dir);
}

// A tensor-parallel w_qkv [2, 3 * 4] over 2 ranks: each holds its 2 columns of q, of k and of v.
TEST(Shard, SlicesLieWhereTheSplitSaysAndPutBackWhole) {
  Tensor whole = Tensor::empty({2, 12});
  for (int64_t i = 0; i < whole.numel(); ++i) whole.f32()[i] = static_cast<float>(i);
  Tensor mine = Tensor::empty({2, 6});
  take_shard(whole, mine, /*dim=*/1, /*parts=*/{1, 1, 1}, /*place=*/1, /*places=*/2);
  // row 0: q columns 2-3, k columns 6-7, v columns 10-11
  const std::vector<float> row0(mine.f32(), mine.f32() + 6), row1(mine.f32() + 6, mine.f32() + 12);
  EXPECT_EQ(row0, (std::vector<float>{2, 3, 6, 7, 10, 11}));
  EXPECT_EQ(row1, (std::vector<float>{14, 15, 18, 19, 22, 23}));
  EXPECT_EQ(whole_shape(mine.shape(), 1, 2), whole.shape());
  // every place's slice put back gives the whole; experts (dim 0, one part) are consecutive rows
  Tensor back = Tensor::zeros({2, 12});
  for (int r = 0; r < 2; ++r) {
    take_shard(whole, mine, 1, {1, 1, 1}, r, 2);
    put_shard(mine, back, 1, {1, 1, 1}, r, 2);
  }
  EXPECT_EQ(std::memcmp(back.f32(), whole.f32(), whole.nbytes()), 0);
  Tensor rows = Tensor::empty({1, 12});
  Tensor tall = Tensor::empty({2, 12});
  std::memcpy(tall.f32(), whole.f32(), whole.nbytes());
  take_shard(tall, rows, 0, {1}, 1, 2);
  EXPECT_EQ(rows.f32()[0], 12.0f);
  EXPECT_THROW(take_shard(whole, rows, 1, {1, 1, 1}, 0, 2), Error);  // shapes that do not match
  // grouped-query: q 6 columns, k and v 3 each ({2, 1, 1}); rank 1 of 3 holds q's columns 2-3,
  // k's 7, v's 10
  Tensor qkv = Tensor::empty({1, 12}), third = Tensor::empty({1, 4}), again = Tensor::zeros({1, 12});
  for (int64_t i = 0; i < 12; ++i) qkv.f32()[i] = static_cast<float>(i);
  take_shard(qkv, third, 1, {2, 1, 1}, 1, 3);
  EXPECT_EQ(std::vector<float>(third.f32(), third.f32() + 4), (std::vector<float>{2, 3, 7, 10}));
  for (int r = 0; r < 3; ++r) {
    take_shard(qkv, third, 1, {2, 1, 1}, r, 3);
    put_shard(third, again, 1, {2, 1, 1}, r, 3);
  }
  EXPECT_EQ(std::memcmp(again.f32(), qkv.f32(), qkv.nbytes()), 0);
}

// What a rank needs of the whole (a checkpoint's load sends it that span alone): experts' rows are
// one run of the whole; w_qkv's slice of rank 1 of 2 spans from its first q column in row 0 to its
// last v column in row 1; the slice taken from the span alone is the one taken from the whole.
TEST(Shard, ASliceIsTakenFromItsSpanOfTheWholeAlone) {
  Tensor whole = Tensor::empty({2, 12}), mine = Tensor::empty({2, 6}), from_span = Tensor::empty({2, 6});
  for (int64_t i = 0; i < whole.numel(); ++i) whole.f32()[i] = static_cast<float>(i);
  const ShardSpan rows = shard_span({1, 12}, 0, {1}, 1, 2);
  EXPECT_EQ(rows.first, 12);
  EXPECT_EQ(rows.end, 24);
  for (int place : {0, 1}) {
    const ShardSpan span = shard_span(mine.shape(), 1, {1, 1, 1}, place, 2);
    EXPECT_EQ(span.first, 2 * place);
    EXPECT_EQ(span.end, 12 + 8 + 2 * place + 2);  // row 1, v (columns 8-11): its two
    std::vector<float> window(whole.f32() + span.first, whole.f32() + span.end);
    take_shard(whole, mine, 1, {1, 1, 1}, place, 2);
    take_shard_from(window.data(), span.first, from_span, 1, {1, 1, 1}, place, 2);
    EXPECT_EQ(std::memcmp(mine.f32(), from_span.f32(), mine.nbytes()), 0) << "place " << place;
  }
}

TEST(Rng, StreamsAreReproducibleAndIndependent) {
  Rng a(7, stream_id(3, 1)), b(7, stream_id(3, 1)), c(7, stream_id(3, 2)), d(8, stream_id(3, 1));
  for (int i = 0; i < 100; ++i) {
    uint64_t x = a.next_u64();
    EXPECT_EQ(x, b.next_u64());
    EXPECT_NE(x, c.next_u64());
    EXPECT_NE(x, d.next_u64());
  }
  Rng n(1, 1);
  double sum = 0, sq = 0;
  const int count = 200000;
  for (int i = 0; i < count; ++i) {
    double v = n.normal();
    sum += v, sq += v * v;
  }
  EXPECT_NEAR(sum / count, 0.0, 0.01);
  EXPECT_NEAR(sq / count, 1.0, 0.01);
}

TEST(RoundMedians, TakeTheRoundsDriftOut) {
  // three keys whose true ratio is 1 : 1.1 : 1.2, measured in rounds whose speed drifts by 2x
  std::map<int, std::vector<double>> values;
  const double drift[] = {1.0, 1.9, 1.3, 2.0, 1.1};
  for (int r = 0; r < 5; ++r)
    for (int key = 0; key < 3; ++key) values[key].push_back(drift[r] * (1.0 + 0.1 * key));
  RoundMedians m = round_medians(values);
  EXPECT_NEAR(m.median[1] / m.median[0], 1.1, 1e-12);
  EXPECT_NEAR(m.median[2] / m.median[0], 1.2, 1e-12);
  EXPECT_NEAR(m.spread[0], 0.0, 1e-12);  // no noise left once the drift is out
  EXPECT_NEAR(m.median[1], 1.3 * 1.1, 1e-12);  // scaled by the median round
  // plain medians would have mixed the drift in: a hiccup in one key's round stays local
  values[0][2] *= 3;
  m = round_medians(values);
  EXPECT_NEAR(m.median[1] / m.median[2], 1.1 / 1.2, 1e-12);
  EXPECT_GT(m.spread[0], 0.5);
}

TEST(RoundMedians, AMeanLevelDoesNotTieKeysThatSitInTheMiddle) {
  // three keys, three rounds: key 1 is round 0's median and faster than it in round 2, key 2 the
  // median of rounds 1 and 2: by the median level both come out exactly 1 x the level (a tie)
  std::map<int, std::vector<double>> values = {{0, {1.0, 1.0, 1.3}}, {1, {1.1, 1.1, 1.0}}, {2, {1.2, 1.05, 1.2}}};
  RoundMedians by_median = round_medians(values);
  EXPECT_EQ(by_median.median[1], by_median.median[2]);
  RoundMedians by_mean = round_medians(values, RoundLevel::mean);
  EXPECT_NE(by_mean.median[1], by_mean.median[2]);
  EXPECT_LT(by_mean.median[1], by_mean.median[2]);  // key 1 is faster in two rounds of three
}

}  // namespace
}  // namespace pm
