// 64-byte aligned float buffers: BLAS and vectorised kernels like whole cache lines.
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

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::size_t alignment = 64;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    std::size_t bytes = (n * sizeof(T) + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, bytes == 0 ? alignment : bytes);
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
