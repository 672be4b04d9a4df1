#include "core/block_cache.h"

#include <algorithm>
#include <utility>

namespace pm {

BlockCache::BlockCache(Allocate allocate, Free free, std::size_t min_bytes, std::size_t granule)
    : allocate_(std::move(allocate)), free_(std::move(free)), min_bytes_(min_bytes), granule_(granule) {}

BlockCache::~BlockCache() { release_cached(); }

void* BlockCache::allocate(std::size_t bytes) {
  if (bytes < min_bytes_) return allocate_(bytes);
  const std::size_t size = (bytes + granule_ - 1) / granule_ * granule_;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cached_.lower_bound(size);
    if (it != cached_.end() && it->first <= size + size / 4) {
      const auto [block_size, data] = *it;
      cached_.erase(it);
      stats_.cached_bytes -= block_size;
      live_.emplace(data, block_size);
      stats_.live_bytes += block_size;
      stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, stats_.live_bytes);
      ++stats_.hits;
      return data;
    }
    ++stats_.misses;
  }
  void* data = allocate_(size);
  std::lock_guard<std::mutex> lock(mutex_);
  live_.emplace(data, size);
  stats_.live_bytes += size;
  stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, stats_.live_bytes);
  trim_locked();
  return data;
}

void BlockCache::deallocate(void* data) {
  if (data == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(data);
    if (it != live_.end()) {
      const std::size_t size = it->second;
      live_.erase(it);
      stats_.live_bytes -= size;
      cached_.emplace(size, data);
      stats_.cached_bytes += size;
      trim_locked();
      return;
    }
  }
  free_(data);  // a small block: never cached
}

// Keeps the cache within the most ever live: the smallest blocks go first (the least reusable).
void BlockCache::trim_locked() {
  while (stats_.cached_bytes > stats_.peak_live_bytes && !cached_.empty()) {
    auto it = cached_.begin();
    stats_.cached_bytes -= it->first;
    free_(it->second);
    cached_.erase(it);
  }
}

void BlockCache::release_cached() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [size, data] : cached_) free_(data);
  cached_.clear();
  stats_.cached_bytes = 0;
}

BlockCache::Stats BlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace pm
