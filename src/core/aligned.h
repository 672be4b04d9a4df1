// Aligned memory: whole cache lines for BLAS and the vectorised kernels, and huge pages for the
// large blocks (allocate_aligned); 64-byte aligned float buffers on it (FloatBuffer).
//
// resize() leaves new elements uninitialised (construct() default-initialises): these are the
// GEMMs' packing buffers, written whole by each packing before any read, and a zero fill first
// cost a memset of megabytes whenever one grew back after clear() (the router's backward: 20 of
// its 80 samples in a profile). resize(n, value) and assign() still fill.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

namespace pm {

// `bytes` (0 counts as 1) of memory aligned to a cache line, to be freed with std::free; null when
// out of memory. Blocks of 2 MB and more are aligned to 2 MB and asked for as transparent huge
// pages (madvise: Debian's default leaves THP to the programs that ask): one TLB entry covers a
// 2 MB page where 512 covered its 4 KB pages, and the GEMMs' panels, packed operands and a pass's
// row buffers span tens of MB.
// PIPEMOE_HUGE_PAGES=0 leaves out the advice (the alignment stays): for a host where compacting
// memory into huge pages at a fault costs more than it saves.
void* allocate_aligned(std::size_t bytes);
bool huge_pages_wanted();  // PIPEMOE_HUGE_PAGES is not "0" (read once)

// `bytes` (at least 2 MB: below that, calloc is as good) of zeros straight from the kernel's zero
// pages (an anonymous mapping, 2 MB aligned, huge pages asked for as above): no page is backed by
// memory, nor cleared, until it is first written, so a block never written costs neither (an
// inference model's gradients). Null when out of address space; freed by free_zero_pages with the
// same size.
void* allocate_zero_pages(std::size_t bytes);
void free_zero_pages(void* p, std::size_t bytes);
inline constexpr std::size_t kZeroPagesFrom = std::size_t{2} << 20;

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = allocate_aligned(n * sizeof(T));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  void construct(U* p) noexcept {
#ifdef PM_POISON_PACKING  // (a check: every element a packing reads must be one it wrote)
    std::memset(static_cast<void*>(p), 0xff, sizeof(U));  // NaN as a float
#else
    ::new (static_cast<void*>(p)) U;
#endif
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};

using FloatBuffer = std::vector<float, AlignedAllocator<float>>;

}  // namespace pm
