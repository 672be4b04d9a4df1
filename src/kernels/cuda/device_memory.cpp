// (built without CUDA: nothing here; cuda_runtime.h may not exist)
#if PIPEMOE_HAVE_CUDA

#include "kernels/cuda/device_memory.h"

#include "core/error.h"

namespace pm::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(ErrorKind::internal, std::string("CUDA: ") + what + ": " + cudaGetErrorString(status));
}

template <BlockHome kHome>
GrowingBuffer<kHome>::~GrowingBuffer() {
  if (!data_) return;
  if constexpr (kHome == BlockHome::device)
    cudaFree(data_);
  else
    cudaFreeHost(data_);
}

template <BlockHome kHome>
void* GrowingBuffer<kHome>::reserve(std::size_t bytes) {
  if (bytes > capacity_) {
    if constexpr (kHome == BlockHome::device) {
      if (data_) check(cudaFree(data_), "cudaFree");
      data_ = nullptr;
      check(cudaMalloc(&data_, bytes), "cudaMalloc");
    } else {
      if (data_) check(cudaFreeHost(data_), "cudaFreeHost");
      data_ = nullptr;
      check(cudaMallocHost(&data_, bytes), "cudaMallocHost");
    }
    capacity_ = bytes;
  }
  return data_;
}

template class GrowingBuffer<BlockHome::device>;
template class GrowingBuffer<BlockHome::pinned_host>;

void upload(const void* host, int64_t rows, int64_t cols, int64_t ld, std::size_t elem, DeviceBuffer& to,
            cudaStream_t stream) {
  void* dst = to.reserve(std::max<std::size_t>(1, rows * cols * elem));
  if (rows * cols == 0) return;
  check(cudaMemcpy2DAsync(dst, cols * elem, host, ld * elem, cols * elem, rows, cudaMemcpyHostToDevice, stream),
        "copy to the GPU");
}

void download(const void* device, int64_t rows, int64_t cols, void* host, int64_t ld, std::size_t elem,
              cudaStream_t stream) {
  if (rows * cols == 0) return;
  check(cudaMemcpy2DAsync(host, ld * elem, device, cols * elem, cols * elem, rows, cudaMemcpyDeviceToHost, stream),
        "copy from the GPU");
}

}  // namespace pm::cuda

#endif
