#include "core/aligned.h"

#include <sys/mman.h>

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

}  // namespace pm
