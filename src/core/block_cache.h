// Large buffers kept for reuse instead of handed back to the system allocator.
//
// Why: a pass's buffers live only as long as the pass needs them (moe_layer.h, release), so the
// same large sizes are freed and allocated again every step. glibc's malloc serves them from
// per-thread arenas that fragment (measured: a layer's resident memory grew by 20 MB per
// iteration with 36 MB in use) or from fresh mmaps that fault in every page again. The cache
// hands a freed block back out for the next request of about its size, from any thread.
//
// Blocks of at least `min_bytes` are rounded up to whole `granule`s and served best-fit from
// the cache when a cached block is at most 1/4 larger than asked for; smaller requests go
// straight to the system. The cache holds at most as many bytes as the most that was ever live
// at once, so the process never keeps more than twice its peak in large blocks.
//
//   BlockCache cache(raw_alloc, raw_free);
//   void* p = cache.allocate(bytes);
//   cache.deallocate(p);
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>

namespace pm {

class BlockCache {
 public:
  using Allocate = std::function<void*(std::size_t bytes)>;  // throws std::bad_alloc when out of memory
  using Free = std::function<void(void* data)>;
  BlockCache(Allocate allocate, Free free, std::size_t min_bytes = std::size_t{1} << 20,
             std::size_t granule = std::size_t{1} << 20);
  ~BlockCache();
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  void* allocate(std::size_t bytes);
  void deallocate(void* data);
  void release_cached();  // hands every cached block back to the system

  struct Stats {
    std::size_t live_bytes = 0, cached_bytes = 0, peak_live_bytes = 0;
    long hits = 0, misses = 0;
  };
  Stats stats() const;

 private:
  void trim_locked();

  Allocate allocate_;
  Free free_;
  std::size_t min_bytes_, granule_;
  mutable std::mutex mutex_;
  std::multimap<std::size_t, void*> cached_;       // free blocks by size
  std::unordered_map<void*, std::size_t> live_;    // size of every large block handed out
  Stats stats_;
};

}  // namespace pm
