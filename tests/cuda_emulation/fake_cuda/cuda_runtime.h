// A fake CUDA runtime for tests/cuda_emulation: "device" memory is host memory the fake keeps a
// list of, copies are memcpy, streams and events do nothing (every call is done when it returns). It checks what a real GPU would punish: a copy
// whose direction does not match where its pointers live, a kernel handed host memory
// (device_memory_holds), a pitch narrower than a row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorMemoryAllocation = 2;
constexpr cudaError_t cudaErrorNotReady = 600;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
struct CUstream_st {};
using cudaStream_t = CUstream_st*;
constexpr unsigned cudaStreamNonBlocking = 1;
struct CUevent_st {
  bool recorded = false;
};
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaEventDisableTiming = 2;
struct cudaDeviceProp {
  char name[256];
  int major, minor;
};

namespace fake_cuda {
struct Memory {
  std::mutex mutex;
  std::map<const char*, std::size_t> blocks;  // start -> bytes
  int errors = 0;                             // misuses seen (the tests expect none)
  long pinned_allocations = 0;                // cudaMallocHost calls that succeeded
};
inline Memory& memory() {
  static Memory m;
  return m;
}
// Whether [p, p + bytes) lies inside one "device" allocation.
inline bool device_memory_holds(const void* p, std::size_t bytes) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  const char* c = static_cast<const char*>(p);
  auto it = m.blocks.upper_bound(c);
  if (it == m.blocks.begin()) return false;
  --it;
  return c >= it->first && c + bytes <= it->first + it->second;
}
inline cudaError_t misuse() {
  std::lock_guard<std::mutex> lock(memory().mutex);
  ++memory().errors;
  return cudaErrorInvalidValue;
}
}  // namespace fake_cuda

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "fake CUDA: misuse"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::strcpy(p->name, "emulated GPU");
  p->major = 9, p->minor = 0;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static CUstream_st stream;
  *s = &stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  // filled with NaNs: a kernel that reads what nobody wrote shows in its results
  std::memset(*p, 0xff, bytes);
  std::lock_guard<std::mutex> lock(fake_cuda::memory().mutex);
  fake_cuda::memory().blocks[static_cast<const char*>(*p)] = bytes;
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  {
    std::lock_guard<std::mutex> lock(fake_cuda::memory().mutex);
    if (fake_cuda::memory().blocks.erase(static_cast<const char*>(p)) != 1) return cudaErrorInvalidValue;
  }
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                                     std::size_t width, std::size_t height, cudaMemcpyKind kind, cudaStream_t) {
  if (height == 0 || width == 0) return cudaSuccess;
  if (dpitch < width || spitch < width) return fake_cuda::misuse();
  const std::size_t dst_span = (height - 1) * dpitch + width, src_span = (height - 1) * spitch + width;
  const bool to_device = kind == cudaMemcpyHostToDevice;
  if (fake_cuda::device_memory_holds(dst, dst_span) != to_device) return fake_cuda::misuse();
  if (fake_cuda::device_memory_holds(src, src_span) == to_device) return fake_cuda::misuse();
  for (std::size_t r = 0; r < height; ++r)
    std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  return cudaMemcpy2DAsync(dst, bytes, src, bytes, bytes, 1, kind, stream);
}
// Pinned host memory: host memory (not on the device list).
inline cudaError_t cudaMallocHost(void** p, std::size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(fake_cuda::memory().mutex);
  ++fake_cuda::memory().pinned_allocations;
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  e->recorded = true;
  return cudaSuccess;
}
// (the work before a record is done when the record returns; querying an event never recorded is
// a misuse here, where a GPU would answer "ready" and hide the bug)
inline cudaError_t cudaEventQuery(cudaEvent_t e) { return e->recorded ? cudaSuccess : fake_cuda::misuse(); }
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaEventQuery(e); }
