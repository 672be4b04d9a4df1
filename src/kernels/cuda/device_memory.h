// Device memory for the CUDA backend, and the copies between it and host memory (host code on
// the CUDA runtime; tests/cuda_emulation runs it on a fake one).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pm::cuda {

// A failed CUDA call as a pm::Error (internal) naming what was tried.
void check(cudaError_t status, const char* what);

// Where a GrowingBuffer's block lives: device memory, or pinned (page-locked) host memory, from
// which copies run at the bus's speed where pageable memory is staged by the driver first
// (measured on an H200: copies were 85-95% of a GPU call's time).
enum class BlockHome { device, pinned_host };

// A block of memory that only grows (a pass asks for the same sizes again and again).
template <BlockHome kHome>
class GrowingBuffer {
 public:
  GrowingBuffer() = default;
  GrowingBuffer(const GrowingBuffer&) = delete;
  GrowingBuffer& operator=(const GrowingBuffer&) = delete;
  ~GrowingBuffer();
  // At least `bytes` (its contents are lost when it grows).
  void* reserve(std::size_t bytes);
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};
using DeviceBuffer = GrowingBuffer<BlockHome::device>;
using PinnedBuffer = GrowingBuffer<BlockHome::pinned_host>;

// Rows [rows, cols] of elem-byte elements, ld elements apart in host memory, into contiguous
// device memory (grown to fit).
void upload(const void* host, int64_t rows, int64_t cols, int64_t ld, std::size_t elem, DeviceBuffer& to,
            cudaStream_t stream);
// Contiguous device rows [rows, cols] out to host rows ld elements apart.
void download(const void* device, int64_t rows, int64_t cols, void* host, int64_t ld, std::size_t elem,
              cudaStream_t stream);

// Rows given by pointers, gathered into one contiguous pinned block (`staging`), then copied in.
// The copy is asynchronous: staging must stay untouched until the stream has passed it.
template <typename T>
void upload_rows(const std::vector<const T*>& rows, int64_t cols, PinnedBuffer& staging, DeviceBuffer& to,
                 cudaStream_t stream) {
  T* block = static_cast<T*>(staging.reserve(std::max<std::size_t>(1, rows.size() * cols) * sizeof(T)));
  for (std::size_t i = 0; i < rows.size(); ++i) std::memcpy(block + i * cols, rows[i], cols * sizeof(T));
  upload(block, static_cast<int64_t>(rows.size()), cols, cols, sizeof(T), to, stream);
}

}  // namespace pm::cuda
