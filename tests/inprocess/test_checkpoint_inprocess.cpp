// Loading a checkpoint's tensors (model/checkpoint.h) on ranks run as threads: rank 0 reads the
// files in place and every rank takes what it holds, whole or its slice of an expert tensor, even
// where the ranks hold different parameters (pipeline stages); a tensor one rank lacks or holds in
// another shape is the same error on every rank, raised before anything changes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "comm/inprocess_communicator.h"
#include "core/error.h"
#include "core/parameter.h"
#include "model/checkpoint.h"
#include "model/optimizer.h"
#include "model/safetensors.h"

namespace pm {
namespace {

namespace fs = std::filesystem;

// A tensor whose values say where they came from: base + their index.
Tensor counting(Shape shape, float base) {
  Tensor t = Tensor::empty(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = base + static_cast<float>(i);
  return t;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A step folder holding "a" [3, 5], the experts' "w" [4, 3] (one row each), "only1" [2] (rank 1's
// alone) and "unused" [6], with their moments and 7 Adam steps.
fs::path write_checkpoint() {
  const fs::path dir = fs::temp_directory_path() / ("pm_ckpt_load_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<NamedTensor> weights, moments;
  const std::map<std::string, Shape> shapes{{"a", {3, 5}}, {"w", {4, 3}}, {"only1", {2}}, {"unused", {6}}};
  float base = 0;
  for (const auto& [name, shape] : shapes) {
    weights.push_back({name, counting(shape, base += 100)});
    moments.push_back({"m." + name, counting(shape, base + 1000)});
    moments.push_back({"v." + name, counting(shape, base + 2000)});
  }
  write_file(dir / "model.safetensors", encode_safetensors(weights, {}));
  write_file(dir / "optimizer.safetensors", encode_safetensors(moments, {{"adam_steps", "7"}}));
  write_file(dir / "state.json", "{}");
  return dir;
}

// Rank r's parameters: "a" whole, its two rows of "w", and on rank 1 "only1"; `extra` adds one.
struct RankParams {
  Tensor values[4], grads[4];
  std::vector<Parameter> params;
  RankParams(int rank, const char* extra_name = nullptr, Shape extra_shape = {}) {
    values[0] = Tensor::zeros({3, 5}), values[1] = Tensor::zeros({2, 3});
    params.push_back({"a", &values[0], &grads[0]});
    params.push_back({"w", &values[1], &grads[1], /*expert=*/true});
    if (rank == 1) {
      values[2] = Tensor::zeros({2});
      params.push_back({"only1", &values[2], &grads[2]});
    }
    if (extra_name) {
      values[3] = Tensor::zeros(std::move(extra_shape));
      params.push_back({extra_name, &values[3], &grads[3]});
    }
    for (Parameter& p : params) p.value->fill(-1.0f);
  }
};

TEST(CheckpointLoad, EveryRankTakesItsTensorsWholeOrItsSliceFromRank0sFiles) {
  const fs::path dir = write_checkpoint();
  run_ranks_in_process(2, [&](Communicator& comm) {
    RankParams mine(comm.rank());
    AdamW optimizer(mine.params);
    load_checkpoint_tensors(comm, dir.string(), mine.params, &optimizer);
    // "a" (the first name, base 100) whole; "w" (base 400): rows 2r and 2r + 1; "only1" (base 200)
    for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(mine.values[0].f32()[i], 100.0f + i);
    for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(mine.values[1].f32()[i], 400.0f + 6 * comm.rank() + i);
    for (int64_t i = 0; i < 2 && comm.rank() == 1; ++i) EXPECT_EQ(mine.values[2].f32()[i], 200.0f + i);
    for (int64_t i = 0; i < 6; ++i) {  // the moments, sliced as their parameter
      EXPECT_EQ(optimizer.first_moments()[1].f32()[i], 1400.0f + 6 * comm.rank() + i);
      EXPECT_EQ(optimizer.second_moments()[1].f32()[i], 2400.0f + 6 * comm.rank() + i);
    }
    EXPECT_EQ(optimizer.steps_taken(), 7);
  });
  fs::remove_all(dir);
}

// The loaded callback (inference packs its experts there): each of the rank's parameters once, in
// the file's order (names sorted here), with its values already in place, and not the moments.
TEST(CheckpointLoad, EachParameterIsReportedOnceItsValuesAreInPlace) {
  const fs::path dir = write_checkpoint();
  run_ranks_in_process(2, [&](Communicator& comm) {
    RankParams mine(comm.rank());
    AdamW optimizer(mine.params);
    std::vector<std::string> seen;
    load_checkpoint_tensors(comm, dir.string(), mine.params, &optimizer, 0, [&](const Parameter& p) {
      seen.push_back(p.name);
      EXPECT_NE(p.value->f32()[0], -1.0f) << p.name << " reported before its values arrived";
    });
    const std::vector<std::string> want =
        comm.rank() == 1 ? std::vector<std::string>{"a", "only1", "w"} : std::vector<std::string>{"a", "w"};
    EXPECT_EQ(seen, want) << "rank " << comm.rank();
  });
  fs::remove_all(dir);
}

TEST(CheckpointLoad, ATensorOneRankLacksOrShapesOtherwiseFailsEveryRankBeforeAnythingChanges) {
  const fs::path dir = write_checkpoint();
  struct Case {
    const char* extra;  // rank 1's parameter beside its usual ones
    Shape shape;
    std::string message;
  };
  for (const Case& c : {Case{"missing", {2}, "has no tensor missing"},
                        Case{"unused", {3, 2}, "unused has shape [6], this model needs [3,2]"}}) {
    std::mutex m;
    std::vector<std::string> errors;
    run_ranks_in_process(2, [&](Communicator& comm) {
      RankParams mine(comm.rank(), comm.rank() == 1 ? c.extra : nullptr, c.shape);
      try {
        load_checkpoint_tensors(comm, dir.string(), mine.params, nullptr);
        ADD_FAILURE() << "rank " << comm.rank() << " loaded a checkpoint without " << c.extra;
      } catch (const Error& e) {
        std::lock_guard lock(m);
        errors.push_back(e.what());
      }
      EXPECT_EQ(mine.values[0].f32()[0], -1.0f) << "rank " << comm.rank() << " changed a parameter first";
    });
    ASSERT_EQ(errors.size(), 2u);
    EXPECT_EQ(errors[0], errors[1]);
    EXPECT_NE(errors[0].find(c.message), std::string::npos) << errors[0];
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace pm
