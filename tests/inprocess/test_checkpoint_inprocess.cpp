// Saving and loading a checkpoint's tensors (model/checkpoint.h) on ranks run as threads. The save
// writes every tensor whole, tensor by tensor (experts gathered from the ranks, pipeline stages'
// tensors sent to rank 0, the tied embedding once); a save that fails is the same error on every
// rank and leaves nothing of its step. The load: rank 0 reads the files in place and every rank
// takes what it holds, whole or its slice of an expert tensor, even where the ranks hold different
// parameters (pipeline stages); a tensor one rank lacks or holds in another shape is the same error
// on every rank, raised before anything changes.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>

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

// The tensors of a safetensors file in the order of their data, with their values.
std::vector<NamedTensor> in_file_order(const fs::path& path, std::map<std::string, std::string>* metadata = nullptr) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<NamedTensor> tensors = decode_safetensors(bytes, path.string(), metadata);
  MappedSafetensors mapped(path.string());
  std::stable_sort(tensors.begin(), tensors.end(), [&](const NamedTensor& a, const NamedTensor& b) {
    return mapped.tensor(a.name, a.tensor.shape()) < mapped.tensor(b.name, b.tensor.shape());
  });
  return tensors;
}

std::vector<float> values_of(const Tensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

// Two ranks, each a pipeline stage of its own: stage 0 holds "emb" (tied: stage 1 holds it too,
// with other values) and experts "w0", stage 1 "emb" and "b"; then one stage of two ranks, the
// experts' rows gathered in rank order. The files hold each tensor once, whole, in stage order and
// each stage's parameter order.
TEST(CheckpointSave, EveryTensorWholeOnceInStageOrder) {
  const fs::path dir = fs::temp_directory_path() / ("pm_ckpt_save_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  for (bool stages : {true, false}) {
    run_ranks_in_process(2, [&](Communicator& comm) {
      std::unique_ptr<Communicator> own = comm.split(comm.rank(), 0);  // a stage of one rank
      Communicator& stage = stages ? *own : comm;
      const float base = 100.0f * static_cast<float>(comm.rank());
      Tensor values[2] = {counting({2, 3}, 10.0f + base), counting({2, 2}, 50.0f + base)}, grads[2];
      std::vector<Parameter> params{{"emb", &values[0], &grads[0]}};
      const bool second = stages && comm.rank() == 1;
      params.push_back({second ? "b" : "w0", &values[1], &grads[1], /*expert=*/!second});
      AdamW optimizer(params);
      for (std::size_t i = 0; i < params.size(); ++i) {
        optimizer.first_moments()[i].fill(1.0f + static_cast<float>(i + 10 * comm.rank()));
        optimizer.second_moments()[i].fill(2.0f + static_cast<float>(i + 10 * comm.rank()));
      }
      optimizer.set_steps_taken(5);
      CheckpointState state{3, nlohmann::json::object(), 2, "{}", nlohmann::json::object()};
      const std::string where = save_checkpoint(comm, dir.string(), params, &optimizer, state, stages ? 1 : 0,
                                                {&stage, stages ? &comm : nullptr});
      EXPECT_EQ(where, (dir / "step-000003").string());
    });
    std::map<std::string, std::string> meta;
    const std::vector<NamedTensor> model = in_file_order(dir / "step-000003" / "model.safetensors", &meta);
    EXPECT_EQ(meta.at("step"), "3");
    ASSERT_EQ(model.size(), 3u - !stages);
    EXPECT_EQ(model[0].name, "emb");
    EXPECT_EQ(values_of(model[0].tensor), values_of(counting({2, 3}, 10.0f)));  // stage 0's, not stage 1's
    EXPECT_EQ(model[1].name, "w0");
    if (stages) {
      EXPECT_EQ(values_of(model[1].tensor), values_of(counting({2, 2}, 50.0f)));
      EXPECT_EQ(model[2].name, "b");
      EXPECT_EQ(values_of(model[2].tensor), values_of(counting({2, 2}, 150.0f)));
    } else {  // rank 0's two rows, then rank 1's
      std::vector<float> want = values_of(counting({2, 2}, 50.0f)), rank1 = values_of(counting({2, 2}, 150.0f));
      want.insert(want.end(), rank1.begin(), rank1.end());
      EXPECT_EQ(model[1].tensor.shape(), (Shape{4, 2}));
      EXPECT_EQ(values_of(model[1].tensor), want);
    }
    const std::vector<NamedTensor> moments = in_file_order(dir / "step-000003" / "optimizer.safetensors", &meta);
    EXPECT_EQ(meta.at("adam_steps"), "5");
    ASSERT_EQ(moments.size(), 2 * model.size());
    for (std::size_t i = 0; i < model.size(); ++i) {
      EXPECT_EQ(moments[2 * i].name, "m." + model[i].name);
      EXPECT_EQ(moments[2 * i + 1].name, "v." + model[i].name);
    }
    if (stages) {
      EXPECT_EQ(moments[4].tensor.f32()[0], 12.0f);  // stage 1's second parameter, "b"
    }
    fs::remove_all(dir);
  }
}

// A save that fails (its folder cannot be made; a write past the file size limit, as a full disk
// fails it): one error on every rank, no hang, and nothing of the step left (the temporary folder
// goes); the checkpoint saved before stays the latest.
TEST(CheckpointSave, AFailedSaveIsOneErrorOnEveryRankAndLeavesNothingOfItsStep) {
  const fs::path dir = fs::temp_directory_path() / ("pm_ckpt_fail_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  write_file(dir / "a_file", "x");
  auto save = [&](const fs::path& where, int64_t step) {
    std::mutex m;
    std::vector<std::string> errors;
    run_ranks_in_process(2, [&](Communicator& comm) {
      RankParams mine(comm.rank());
      AdamW optimizer(mine.params);
      CheckpointState state{step, nlohmann::json::object(), 2, "{}", nlohmann::json::object()};
      try {
        save_checkpoint(comm, where.string(), mine.params, &optimizer, state);
      } catch (const Error& e) {
        std::lock_guard lock(m);
        errors.push_back(e.what());
      }
    });
    return errors;
  };
  std::vector<std::string> errors = save(dir / "a_file" / "ck", 1);
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0], errors[1]);
  EXPECT_NE(errors[0].find("cannot create checkpoint folder"), std::string::npos) << errors[0];

  ASSERT_TRUE(save(dir / "ck", 1).empty());
  // files of at most 64 KB from here: the model file's header fits, its tensor does not
  // (SIGXFSZ ignored: the write fails with EFBIG instead of ending the process)
  struct rlimit before {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &before), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = before;
  small.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  // (the header of a handful of tensors is under 1 KB; a 20000-float tensor is 80 KB)
  std::vector<std::string> full;
  {
    std::mutex m;
    run_ranks_in_process(2, [&](Communicator& comm) {
      Tensor big = Tensor::zeros({20000}), grad;
      std::vector<Parameter> params{{"big", &big, &grad}};
      CheckpointState state{2, nlohmann::json::object(), 2, "{}", nlohmann::json::object()};
      try {
        save_checkpoint(comm, (dir / "ck").string(), params, nullptr, state);
      } catch (const Error& e) {
        std::lock_guard lock(m);
        full.push_back(e.what());
      }
    });
  }
  ::setrlimit(RLIMIT_FSIZE, &before);
  std::signal(SIGXFSZ, old_handler);
  ASSERT_EQ(full.size(), 2u);
  EXPECT_EQ(full[0], full[1]);
  EXPECT_NE(full[0].find("model.safetensors failed"), std::string::npos) << full[0];
  EXPECT_FALSE(fs::exists(dir / "ck" / ".tmp-step-000002"));
  EXPECT_FALSE(fs::exists(dir / "ck" / "step-000002"));
  EXPECT_EQ(checkpoint_step_dir((dir / "ck").string()), (dir / "ck" / "step-000001").string());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace pm
