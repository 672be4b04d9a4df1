// The CUDA backend on a GPU: its GEMMs and experts against the CPU backend, bit for bit (the GPU
// kernels run the CPU kernels' chains, kernels/cuda/device_kernels.h); skipped, saying why, where
// the build has no CUDA or the machine no GPU. The same cases run everywhere on an emulated GPU
// (tests/cuda_emulation). The choice of backend by name is checked everywhere.
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"

#define PM_CUDA_TEST_SUITE CudaBackend
#include "unit/cuda_backend_cases.h"

// The NCCL transport on this machine's GPUs, one rank per GPU (skipped without).
#define PM_NCCL_TEST_SUITE NcclTransport
#define PM_NCCL_MAX_RANKS() pm::nccl_devices()
#define PM_NCCL_NO_MISUSE() (void)0
#include "unit/nccl_transport_cases.h"

namespace pm {
namespace {

TEST(CudaBackend, IsChosenByNameOrRefusedClearly) {
  EXPECT_EQ(&backend_named("cpu"), &cpu_backend());
  try {
    backend_named("tpu");
    FAIL() << "an unknown backend was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::usage);
    EXPECT_NE(std::string(e.what()).find("one of cpu|cuda"), std::string::npos) << e.what();
  }
  std::string why;
  if (cuda_available(&why)) {
    EXPECT_EQ(backend_named("cuda").device(), Device::cuda);
  } else {
    EXPECT_FALSE(why.empty());
    try {
      backend_named("cuda");
      FAIL() << "the CUDA backend was handed out where it cannot run";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::usage);
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace pm
