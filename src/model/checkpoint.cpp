#include "model/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/json_input.h"
#include "core/shard.h"
#include "model/safetensors.h"

namespace pm {
namespace fs = std::filesystem;
namespace {

// Writes bytes to path and flushes them to disk.
void write_file_durably(const std::string& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  PM_IO_CHECK(fd >= 0, "cannot create {}: {}", path, std::strerror(errno));
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw Error(ErrorKind::io, fmt::format("writing {} failed: {}", path, std::strerror(err)));
    }
    done += static_cast<std::size_t>(n);
  }
  bool synced = ::fsync(fd) == 0;
  ::close(fd);
  PM_IO_CHECK(synced, "cannot flush {} to disk: {}", path, std::strerror(errno));
}

// A folder's entries (files created or renamed in it) reach the disk only when the folder is
// flushed too.
void sync_folder(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY);
  PM_IO_CHECK(fd >= 0, "cannot open folder {}: {}", path, std::strerror(errno));
  bool synced = ::fsync(fd) == 0;
  ::close(fd);
  PM_IO_CHECK(synced, "cannot flush folder {} to disk: {}", path, std::strerror(errno));
}

// A small file whole (state.json, tokenizer.json, latest), read straight into the string; the
// tensors' files are mapped instead (CheckpointFile).
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  PM_REQUIRE(in.good(), "cannot read {}", path);
  const std::streamoff size = in.tellg();
  PM_REQUIRE(size >= 0, "cannot read {}", path);
  std::string bytes(static_cast<std::size_t>(size), '\0');
  in.seekg(0);
  in.read(bytes.data(), size);
  PM_REQUIRE(in.gcount() == size, "cannot read {}: {} of {} bytes", path, in.gcount(), size);
  return bytes;
}

// The whole tensor on rank 0: a sharded one's slices of ranks 0 .. spread - 1 put in their places
// (core/shard.h: experts concatenated along dim 0 in rank order).
Tensor gather_global(Communicator& comm, const Tensor& local, const Parameter& p, int spread) {
  if (!p.expert || spread == 1) return comm.rank() == 0 ? local.clone() : Tensor();
  if (comm.rank() != 0) {
    if (comm.rank() < spread) comm.send(local.raw(), local.numel(), DType::f32, 0);
    return Tensor();
  }
  Tensor global = Tensor::empty(whole_shape(local.shape(), p.shard_dim, spread));
  put_shard(local, global, p.shard_dim, p.shard_parts, 0, spread);
  Tensor piece = Tensor::empty(local.shape());
  for (int r = 1; r < spread; ++r) {
    comm.recv(piece.raw(), piece.numel(), DType::f32, r);
    put_shard(piece, global, p.shard_dim, p.shard_parts, r, spread);
  }
  return global;
}

// The step folder DIR names: DIR itself if it holds state.json, else DIR/<contents of latest>.
std::string resolve_step_dir(const std::string& dir) {
  if (fs::exists(fs::path(dir) / "state.json")) return dir;
  fs::path latest = fs::path(dir) / "latest";
  PM_REQUIRE(fs::exists(latest), "{} is not a checkpoint: it has neither state.json nor latest", dir);
  std::string name = read_file(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  std::string step_dir = (fs::path(dir) / name).string();
  PM_REQUIRE(fs::exists(fs::path(step_dir) / "state.json"), "{}/latest names {}, which is not a checkpoint", dir, step_dir);
  return step_dir;
}

// Runs fn on rank 0; every rank then raises the same usage error if it failed there.
template <typename Fn>
void on_rank0_agreed(Communicator& comm, Fn&& fn) {
  std::string error;
  if (comm.rank() == 0) {
    try {
      fn();
    } catch (const Error& e) {
      error = e.what();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  error = comm.broadcast_string(error, 0);
  PM_REQUIRE(error.empty(), "{}", error);
}

// Every stage's tensors on rank 0 of the pipeline group: the stages' lists appended in stage
// order, a name already there skipped.
void collect_stages(Communicator& pipeline, std::vector<NamedTensor>& tensors, const char* what) {
  std::vector<std::string> parts = pipeline.gather_strings(encode_safetensors(tensors, {}), 0);
  for (std::size_t s = 1; s < parts.size(); ++s)
    for (NamedTensor& t : decode_safetensors(parts[s], fmt::format("stage {}'s {}", s, what))) {
      bool seen = false;
      for (const NamedTensor& have : tensors) seen = seen || have.name == t.name;
      if (!seen) tensors.push_back(std::move(t));
    }
}

// The first non-empty of the ranks' strings (in rank order), on every rank: an error one rank
// found, raised by all.
std::string first_of_any_rank(Communicator& comm, const std::string& mine) {
  std::string first;
  for (std::string& s : comm.gather_strings(mine, 0))
    if (first.empty()) first = std::move(s);
  return comm.broadcast_string(first, 0);
}

// Where a checkpoint tensor goes on this rank: into a parameter's value (or an optimizer moment of
// it), whole or this rank's slice as the parameter is sliced.
struct LoadTarget {
  Tensor* into = nullptr;
  const Parameter* p = nullptr;
};

// One safetensors file of a checkpoint, read by every rank from rank 0's mapping of it: no rank
// holds the whole file in memory (it took four copies of it at the peak: the bytes read, broadcast
// and decoded, and the parameters), and each tensor is copied once, from the page cache into its
// place, then broadcast to the other ranks in turn.
class CheckpointFile {
 public:
  // mapped: rank 0's mapping of path (null elsewhere); every rank gets its listing.
  CheckpointFile(Communicator& comm, std::unique_ptr<MappedSafetensors> mapped, std::string path)
      : comm_(comm), mapped_(std::move(mapped)), path_(std::move(path)) {
    nlohmann::json listing = nlohmann::json::array();
    if (mapped_)
      for (const auto& [name, shape] : mapped_->listing()) listing.push_back(nlohmann::json::array({name, shape}));
    for (const auto& entry : nlohmann::json::parse(comm.broadcast_string(listing.dump(), 0)))
      listing_.emplace_back(entry[0].get<std::string>(), entry[1].get<Shape>());
  }

  // The first target the file lacks or holds in another shape, as an error message ("" if none).
  std::string mismatch(const std::map<std::string, LoadTarget>& targets, int spread) const {
    std::map<std::string, Shape> held(listing_.begin(), listing_.end());
    for (const auto& [name, t] : targets) {
      const auto it = held.find(name);
      if (it == held.end()) return fmt::format("{} has no tensor {}: it was written for another model", path_, name);
      const Shape want = whole_shape_of(t, spread);
      if (it->second != want)
        return fmt::format("{}: {} has shape {}, this model needs {}", path_, name, shape_str(it->second), shape_str(want));
    }
    return "";
  }

  // Every tensor of the file in turn, into the targets this rank has for it (others pass by).
  void copy_into(const std::map<std::string, LoadTarget>& targets, int spread, int place,
                 const std::function<void(const Parameter&)>& loaded = {}) {
    // a tensor this rank slices or does not keep; from the kernel's zero pages, huge where it gives
    // them (released and taken again, 4 KB pages cost a second a model: faults while MPI copies in)
    Tensor scratch;
    for (const auto& [name, shape] : listing_) {
      const auto it = targets.find(name);
      const LoadTarget* t = it == targets.end() ? nullptr : &it->second;
      if (!t && comm_.size() == 1) continue;
      const bool whole_here = t && t->into->shape() == shape;
      const int64_t numel = shape_numel(shape);
      float* buffer = nullptr;
      if (whole_here) {
        buffer = t->into->f32();
      } else {
        if (scratch.numel() < numel) scratch = Tensor(), scratch = Tensor::zeros({numel});
        buffer = scratch.f32();
      }
      if (mapped_) {  // (its pages then leave this process: the page cache keeps them)
        const float* source = mapped_->tensor(name, shape);
        std::memcpy(buffer, source, static_cast<std::size_t>(numel) * sizeof(float));
        mapped_->release(source, static_cast<uint64_t>(numel) * sizeof(float));
      }
      if (comm_.size() > 1) comm_.broadcast(buffer, numel, DType::f32, 0);
      if (t && !whole_here)
        take_shard(Tensor::view_of(buffer, shape), *t->into, t->p->shard_dim, t->p->shard_parts, place, spread);
      if (!t || !loaded) continue;
      // (what loaded does may take memory, inference's packing: the whole tensor is not kept for it)
      if (!whole_here) scratch = Tensor();
      loaded(*t->p);
    }
  }

 private:
  static Shape whole_shape_of(const LoadTarget& t, int spread) {
    return t.p->expert ? whole_shape(t.into->shape(), t.p->shard_dim, spread) : t.into->shape();
  }

  Communicator& comm_;
  std::unique_ptr<MappedSafetensors> mapped_;
  std::string path_;
  std::vector<std::pair<std::string, Shape>> listing_;  // the file's tensors, in the order they are read
};

}  // namespace

std::string checkpoint_step_dir(const std::string& dir) { return resolve_step_dir(dir); }

std::string save_checkpoint(Communicator& comm, const std::string& dir, const std::vector<Parameter>& params,
                            AdamW* optimizer, const CheckpointState& state, int expert_ranks, CheckpointGroups groups) {
  Communicator& stage = groups.stage ? *groups.stage : comm;
  const int spread = expert_ranks > 0 ? expert_ranks : stage.size();
  PM_CHECK(stage.size() % spread == 0, "experts spread over {} of {} ranks", spread, stage.size());
  std::vector<NamedTensor> model, moments;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Parameter& p = params[i];
    Tensor w = gather_global(stage, *p.value, p, spread);
    if (stage.rank() == 0) model.push_back({p.name, std::move(w)});
    if (!optimizer) continue;
    Tensor m = gather_global(stage, optimizer->first_moments()[i], p, spread);
    Tensor v = gather_global(stage, optimizer->second_moments()[i], p, spread);
    if (stage.rank() == 0) moments.push_back({"m." + p.name, std::move(m)}), moments.push_back({"v." + p.name, std::move(v)});
  }
  // the stages' first ranks form one pipeline group, whose rank 0 is rank 0
  if (groups.pipeline && groups.pipeline->size() > 1 && stage.rank() == 0) {
    collect_stages(*groups.pipeline, model, "model");
    if (optimizer) collect_stages(*groups.pipeline, moments, "optimizer state");
  }
  char name[32];
  std::snprintf(name, sizeof name, "step-%06ld", static_cast<long>(state.step));
  std::string step_dir = (fs::path(dir) / name).string();
  on_rank0_agreed(comm, [&] {
    std::error_code ec;
    fs::create_directories(dir, ec);
    PM_IO_CHECK(!ec, "cannot create checkpoint folder {}: {}", dir, ec.message());
    std::string tmp = (fs::path(dir) / (std::string(".tmp-") + name)).string();
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    PM_IO_CHECK(!ec, "cannot create {}: {}", tmp, ec.message());
    nlohmann::json s = {{"format", "pipemoe-checkpoint"}, {"version", 1}, {"step", state.step},
                        {"world_size", state.world_size}, {"config", state.config}, {"extra", state.extra}};
    write_file_durably(tmp + "/model.safetensors", encode_safetensors(model, {{"format", "pt"}, {"step", std::to_string(state.step)}}));
    if (optimizer)
      write_file_durably(tmp + "/optimizer.safetensors",
                         encode_safetensors(moments, {{"adam_steps", std::to_string(optimizer->steps_taken())}}));
    write_file_durably(tmp + "/tokenizer.json", state.tokenizer_json);
    write_file_durably(tmp + "/state.json", s.dump(2));
    sync_folder(tmp);  // the step's files are on disk before the step is renamed into place
    fs::remove_all(step_dir, ec);  // an older attempt at the same step
    fs::rename(tmp, step_dir, ec);
    PM_IO_CHECK(!ec, "cannot move {} to {}: {}", tmp, step_dir, ec.message());
    sync_folder(dir);  // the rename is on disk before latest names it
    write_file_durably((fs::path(dir) / "latest.tmp").string(), std::string(name) + "\n");
    fs::rename(fs::path(dir) / "latest.tmp", fs::path(dir) / "latest", ec);
    PM_IO_CHECK(!ec, "cannot update {}/latest: {}", dir, ec.message());
    sync_folder(dir);
  });
  return step_dir;
}

CheckpointState parse_checkpoint_state(const std::string& text, const std::string& dir) {
  CheckpointState s;
  try {
    auto j = parse_json_input(text, dir + ": state.json", "is corrupt", std::size_t{1} << 20);
    PM_REQUIRE(j.at("format") == "pipemoe-checkpoint", "{} is not a pipemoe checkpoint", dir);
    const nlohmann::json& step = j.at("step");
    const nlohmann::json& world = j.at("world_size");
    PM_REQUIRE(step.is_number_unsigned() && step.get<uint64_t>() >= 1 && step.get<uint64_t>() <= (uint64_t{1} << 40),
               "{}: state.json is corrupt: 'step' must be a positive step number, got {}", dir, brief(step));
    PM_REQUIRE(world.is_number_unsigned() && world.get<uint64_t>() >= 1 && world.get<uint64_t>() <= (1u << 20),
               "{}: state.json is corrupt: 'world_size' must be a positive number of ranks, got {}", dir, brief(world));
    s.step = step.get<int64_t>();
    s.world_size = world.get<int>();
    s.config = j.at("config");
    PM_REQUIRE(s.config.is_object(), "{}: state.json is corrupt: 'config' must be an object", dir);
    s.extra = j.value("extra", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{}: state.json is corrupt: {}", dir, e.what()));
  }
  return s;
}

CheckpointState read_checkpoint_state(Communicator& comm, const std::string& dir) {
  std::string text, tokenizer;
  on_rank0_agreed(comm, [&] {
    std::string step_dir = resolve_step_dir(dir);
    text = read_file(step_dir + "/state.json");
    tokenizer = read_file(step_dir + "/tokenizer.json");
  });
  text = comm.broadcast_string(text, 0);
  CheckpointState s = parse_checkpoint_state(text, dir);
  s.tokenizer_json = comm.broadcast_string(tokenizer, 0);
  return s;
}

void load_checkpoint_tensors(Communicator& comm, const std::string& dir, std::vector<Parameter>& params, AdamW* optimizer,
                             int expert_ranks, const std::function<void(const Parameter&)>& loaded) {
  const int spread = expert_ranks > 0 ? expert_ranks : comm.size(), place = comm.rank() % spread;
  std::unique_ptr<MappedSafetensors> model_map, moments_map;  // rank 0's
  std::string step_dir, adam_steps;
  on_rank0_agreed(comm, [&] {
    step_dir = resolve_step_dir(dir);
    model_map = std::make_unique<MappedSafetensors>(step_dir + "/model.safetensors");
    if (!optimizer) return;
    moments_map = std::make_unique<MappedSafetensors>(step_dir + "/optimizer.safetensors");
    const auto& meta = moments_map->metadata();
    adam_steps = meta.count("adam_steps") ? meta.at("adam_steps") : "0";
  });
  step_dir = comm.broadcast_string(step_dir, 0);
  CheckpointFile model(comm, std::move(model_map), step_dir + "/model.safetensors");
  std::map<std::string, LoadTarget> weights, moments;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Parameter& p = params[i];
    weights[p.name] = {p.value, &p};
    if (optimizer) {
      moments["m." + p.name] = {&optimizer->first_moments()[i], &p};
      moments["v." + p.name] = {&optimizer->second_moments()[i], &p};
    }
  }
  // Every name and shape, on every rank, before anything changes.
  std::string mismatch = model.mismatch(weights, spread);
  std::unique_ptr<CheckpointFile> moments_file;
  if (optimizer) {
    moments_file = std::make_unique<CheckpointFile>(comm, std::move(moments_map), step_dir + "/optimizer.safetensors");
    if (mismatch.empty()) mismatch = moments_file->mismatch(moments, spread);
  }
  mismatch = first_of_any_rank(comm, mismatch);
  PM_REQUIRE(mismatch.empty(), "{}", mismatch);
  model.copy_into(weights, spread, place, loaded);
  if (!optimizer) return;
  moments_file->copy_into(moments, spread, place);
  optimizer->set_steps_taken(std::stoll(comm.broadcast_string(adam_steps, 0)));
}

}  // namespace pm
