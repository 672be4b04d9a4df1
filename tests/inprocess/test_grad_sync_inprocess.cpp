// The data-parallel gradient sum (model/grad_sync.h) on ranks run as threads: each rank's
// gradients summed over the ranks where the backward left them (they are views of the buckets'
// memory, each from a 64-byte line), the expert ones left alone, and owning their memory again
// once the sync is gone.
#include <gtest/gtest.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "comm/inprocess_communicator.h"
#include "core/parameter.h"
#include "model/grad_sync.h"
#include "sched/executor.h"

namespace pm {
namespace {

TEST(GradientSync, SumsEachRanksGradientsInPlaceAndGivesThemBackOnDestruction) {
  for (DType wire : {DType::f32, DType::bf16}) {
    std::mutex m;
    std::vector<std::vector<float>> summed(3), after_destruction(3);
    run_ranks_in_process(2, [&](Communicator& comm) {
      // block 0's two tensors (odd sizes: the second starts on a new line), the rest, an expert's
      Tensor values[4], grads[4];
      const char* names[4] = {"blocks.0.a", "blocks.0.b", "wte", "blocks.0.moe.w1"};
      const Shape shapes[4] = {{3, 5}, {7}, {2, 3}, {4}};
      std::vector<Parameter> params;
      for (int i = 0; i < 4; ++i) {
        values[i] = Tensor::zeros(shapes[i]);
        grads[i] = Tensor::zeros(shapes[i]);
        float* g = grads[i].f32();
        // small whole numbers: exact in bf16 and summed exactly
        for (int64_t j = 0; j < grads[i].numel(); ++j) g[j] = static_cast<float>((comm.rank() + 1) * (j + i + 1));
        params.push_back({names[i], &values[i], &grads[i], /*expert=*/i == 3});
      }
      {
        GradientSync sync(params, 1, comm, /*overlap=*/true, nullptr, 1.0f, wire);
        for (int i = 0; i < 3; ++i)  // views from 64-byte lines, their values kept
          EXPECT_EQ(reinterpret_cast<uintptr_t>(grads[i].f32()) % 64, 0u) << names[i];
        EXPECT_EQ(grads[1].f32()[6], (comm.rank() + 1) * 8.0f);
        Executor executor;
        TaskGraph g;
        sync.grads_ready(g, 0, {});
        sync.grads_ready(g, -1, {});
        executor.run(g);
        std::lock_guard lock(m);
        for (int i = 0; i < 3; ++i)
          if (comm.rank() == 0) summed[i].assign(grads[i].f32(), grads[i].f32() + grads[i].numel());
        // an expert's gradient stays this rank's own
        for (int64_t j = 0; j < 4; ++j) EXPECT_EQ(grads[3].f32()[j], (comm.rank() + 1) * (j + 4.0f));
      }
      // the sync is gone: the gradients own their values
      EXPECT_TRUE(grads[0].owns_memory());
      grads[0].f32()[0] += 1.0f;
      std::lock_guard lock(m);
      if (comm.rank() == 0) after_destruction[0].assign(grads[0].f32(), grads[0].f32() + grads[0].numel());
    });
    for (int i = 0; i < 3; ++i)
      for (size_t j = 0; j < summed[i].size(); ++j)  // rank 0's (j + i + 1) plus rank 1's twice that
        EXPECT_EQ(summed[i][j], 3.0f * (j + i + 1)) << "tensor " << i << " value " << j;
    ASSERT_EQ(after_destruction[0].size(), 15u);
    EXPECT_EQ(after_destruction[0][0], 4.0f);
    EXPECT_EQ(after_destruction[0][14], 45.0f);
  }
}

}  // namespace
}  // namespace pm
