#include "core/aligned.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pm {

bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("PIPEMOE_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}

void* allocate_aligned(std::size_t bytes) {
  constexpr std::size_t line = 64, page = 4096, huge = std::size_t{2} << 20;
  if (bytes < huge) {
    const std::size_t rounded = (bytes + line - 1) / line * line;
    return std::aligned_alloc(line, rounded == 0 ? line : rounded);
  }
  // Whole pages, from a 2 MB boundary: every whole 2 MB of the block can be a huge page, and a
  // partial last one stays in small pages (no memory spent on rounding up).
  const std::size_t rounded = (bytes + page - 1) / page * page;
  void* p = nullptr;  // (posix_memalign: aligned_alloc wants a size that is a multiple of the alignment)
  if (::posix_memalign(&p, huge, rounded) != 0) return nullptr;
  if (huge_pages_wanted()) ::madvise(p, rounded, MADV_HUGEPAGE);  // advice: a kernel without THP ignores it
  return p;
}

namespace {

std::size_t whole_pages(std::size_t bytes) {
  constexpr std::size_t page = 4096;
  return (bytes + page - 1) / page * page;
}

}  // namespace

void* allocate_zero_pages(std::size_t bytes) {
  // Mapped 2 MB more than asked for, then the ends trimmed, so that the block starts on a 2 MB
  // boundary (each whole 2 MB of it can be a huge page).
  const std::size_t size = whole_pages(bytes), huge = kZeroPagesFrom;
  void* mapped = ::mmap(nullptr, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<std::uintptr_t>(mapped);
  const std::uintptr_t aligned = (start + huge - 1) / huge * huge;
  if (aligned > start) ::munmap(mapped, aligned - start);
  const std::size_t tail = start + size + huge - (aligned + size);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + size), tail);
  void* p = reinterpret_cast<void*>(aligned);
  if (huge_pages_wanted()) ::madvise(p, size, MADV_HUGEPAGE);
  return p;
}

void free_zero_pages(void* p, std::size_t bytes) {
  if (p) ::munmap(p, whole_pages(bytes));
}

}  // namespace pm
