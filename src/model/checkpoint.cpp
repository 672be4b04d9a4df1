#include "model/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/json_input.h"
#include "core/shard.h"
#include "model/safetensors.h"

namespace pm {
namespace fs = std::filesystem;
namespace {

// A file written in pieces and flushed to disk at the end; closed unflushed if abandoned (the
// save's temporary folder then goes).
class DurableFile {
 public:
  explicit DurableFile(const std::string& path)
      : path_(path), fd_(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644)) {
    PM_IO_CHECK(fd_ >= 0, "cannot create {}: {}", path, std::strerror(errno));
  }
  ~DurableFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  void append(const void* data, std::size_t size) {
    for (std::size_t done = 0; done < size;) {
      const ssize_t n = ::write(fd_, static_cast<const char*>(data) + done, size - done);
      if (n < 0 && errno == EINTR) continue;
      PM_IO_CHECK(n >= 0, "writing {} failed: {}", path_, std::strerror(errno));
      done += static_cast<std::size_t>(n);
    }
  }
  void finish() {
    const bool synced = ::fsync(fd_) == 0;
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    PM_IO_CHECK(synced, "cannot flush {} to disk: {}", path_, std::strerror(err));
  }

 private:
  std::string path_;
  int fd_;
};

// Writes bytes to path and flushes them to disk.
void write_file_durably(const std::string& path, const std::string& bytes) {
  DurableFile file(path);
  file.append(bytes.data(), bytes.size());
  file.finish();
}

// A safetensors file written tensor by tensor in its listing's order: a save holds one tensor at a
// time, where it held the whole model and its moments, then the files' bytes, on rank 0 (2.1x the
// training run's memory: docs/BENCHMARKS.md, "A checkpoint written tensor by tensor").
class SafetensorsFileWriter {
 public:
  SafetensorsFileWriter(const std::string& path, TensorListing listing,
                        const std::map<std::string, std::string>& metadata)
      : file_(path), listing_(std::move(listing)) {
    const std::string header = safetensors_header(listing_, metadata);
    file_.append(header.data(), header.size());
  }
  void append(const std::string& name, const Tensor& t) {
    PM_CHECK(next_ < listing_.size() && listing_[next_].first == name && listing_[next_].second == t.shape(),
             "checkpoint writer: {} {} out of the listing's order", name, shape_str(t.shape()));
    ++next_;
    file_.append(t.raw(), t.nbytes());
  }
  void finish() {
    PM_CHECK(next_ == listing_.size(), "checkpoint writer: {} of {} tensors written", next_, listing_.size());
    file_.finish();
  }

 private:
  DurableFile file_;
  TensorListing listing_;
  std::size_t next_ = 0;
};

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

// A tensor's shape in a checkpoint, from this rank's (local) one: an expert tensor's slices of
// `spread` ranks side by side, any other as it is.
Shape whole_shape_of(const Parameter& p, const Shape& local, int spread) {
  return p.expert ? whole_shape(local, p.shard_dim, spread) : local;
}

// fn(the whole tensor) on the group's rank 0: a sharded one's slices of ranks 0 .. spread - 1 put
// in their places (core/shard.h: experts concatenated along dim 0 in rank order), any other as it is.
template <typename Fn>
void with_whole(Communicator& comm, const Tensor& local, const Parameter& p, int spread, Fn&& fn) {
  if (!p.expert || spread == 1) {
    if (comm.rank() == 0) fn(local);
    return;
  }
  if (comm.rank() != 0) {
    if (comm.rank() < spread) comm.send(local.raw(), local.numel(), DType::f32, 0);
    return;
  }
  Tensor global = Tensor::empty(whole_shape_of(p, local.shape(), spread));
  put_shard(local, global, p.shard_dim, p.shard_parts, 0, spread);
  Tensor piece = Tensor::empty(local.shape());
  for (int r = 1; r < spread; ++r) {
    comm.recv(piece.raw(), piece.numel(), DType::f32, r);
    put_shard(piece, global, p.shard_dim, p.shard_parts, r, spread);
  }
  fn(global);
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

// Rank 0's part of a collective job, in steps between which the ranks communicate: after the
// first step that fails, rank 0 runs no more of them but still takes part in everything else, and
// agree() raises its error, the same usage error, on every rank.
class Rank0Steps {
 public:
  explicit Rank0Steps(Communicator& comm) : comm_(comm) {}
  template <typename Fn>
  void run(Fn&& fn) {
    if (comm_.rank() != 0 || failed()) return;
    try {
      fn();
    } catch (const std::exception& e) {
      error_ = e.what();
      if (error_.empty()) error_ = "an unnamed error";
    }
  }
  bool failed() const { return !error_.empty(); }
  void agree() {
    error_ = comm_.broadcast_string(error_, 0);
    PM_REQUIRE(error_.empty(), "{}", error_);
  }

 private:
  Communicator& comm_;
  std::string error_;
};

// Runs fn on rank 0; every rank then raises the same usage error if it failed there.
template <typename Fn>
void on_rank0_agreed(Communicator& comm, Fn&& fn) {
  Rank0Steps steps(comm);
  steps.run(std::forward<Fn>(fn));
  steps.agree();
}

// What a save writes, in order: each parameter whole (its name, its whole shape) and the pipeline
// stage whose first rank sends it to rank 0; the stages' lists in stage order, a name an earlier
// stage has (the tied embedding) left out. On the stages' first ranks (pipeline: their group).
struct SaveEntry {
  std::string name;
  Shape shape;
  int stage = 0;
};

std::vector<SaveEntry> save_listing(const std::vector<Parameter>& params, int spread, Communicator* pipeline) {
  nlohmann::json mine = nlohmann::json::array();
  for (const Parameter& p : params) mine.push_back({p.name, whole_shape_of(p, p.value->shape(), spread)});
  const std::vector<std::string> stages =
      pipeline ? pipeline->gather_strings(mine.dump(), 0) : std::vector{mine.dump()};
  nlohmann::json all = nlohmann::json::array();
  std::set<std::string> seen;
  for (std::size_t s = 0; s < stages.size(); ++s)
    for (const auto& entry : nlohmann::json::parse(stages[s]))
      if (seen.insert(entry[0].get<std::string>()).second) all.push_back({entry[0], entry[1], s});
  std::vector<SaveEntry> out;
  for (const auto& e : nlohmann::json::parse(pipeline ? pipeline->broadcast_string(all.dump(), 0) : all.dump()))
    out.push_back({e[0].get<std::string>(), e[1].get<Shape>(), e[2].get<int>()});
  return out;
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
// place on rank 0 and sent from there to the ranks that hold it, in turn.
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
      const Shape want = whole_shape_of(*t.p, t.into->shape(), spread);
      if (it->second != want)
        return fmt::format("{}: {} has shape {}, this model needs {}", path_, name, shape_str(it->second), shape_str(want));
    }
    return "";
  }

  // Every tensor of the file in turn, into the targets this rank has for it. A tensor every rank
  // takes whole goes to all in one broadcast; any other, rank 0 sends each rank that holds it the
  // span of it that rank takes (its experts' rows) and no more: a rank receives its share of the
  // experts, not every expert, and ranks of other pipeline stages nothing.
  void copy_into(const std::map<std::string, LoadTarget>& targets, int spread, int place,
                 const std::function<void(const Parameter&)>& loaded = {}) {
    std::vector<const LoadTarget*> target(listing_.size(), nullptr);
    std::vector<ShardSpan> mine(listing_.size());  // empty: not held here
    for (std::size_t i = 0; i < listing_.size(); ++i) {
      const auto it = targets.find(listing_[i].first);
      if (it == targets.end()) continue;
      const LoadTarget& t = it->second;
      target[i] = &t;
      mine[i] = t.into->shape() == listing_[i].second
                    ? ShardSpan{0, t.into->numel()}
                    : shard_span(t.into->shape(), t.p->shard_dim, t.p->shard_parts, place, spread);
    }
    const std::vector<std::vector<ShardSpan>> spans = spans_of_every_rank(mine);  // rank 0's
    const std::string broadcast = broadcast_flags(spans);
    // a span that is not the whole of what this rank keeps is received here first; from the
    // kernel's zero pages, huge where it gives them (released and taken again, 4 KB pages cost a
    // second a model: faults while MPI copies in)
    Tensor scratch;
    for (std::size_t i = 0; i < listing_.size(); ++i) {
      const auto& [name, shape] = listing_[i];
      const LoadTarget* t = target[i];
      const int64_t numel = shape_numel(shape);
      const float* source = mapped_ ? mapped_->tensor(name, shape) : nullptr;  // rank 0's
      if (broadcast[i] == '1') {
        if (source) std::memcpy(t->into->f32(), source, static_cast<std::size_t>(numel) * sizeof(float));
        comm_.broadcast(t->into->f32(), numel, DType::f32, 0);
      } else if (source) {
        for (int r = 1; r < comm_.size(); ++r)
          if (spans[r][i].size() > 0) comm_.send(source + spans[r][i].first, spans[r][i].size(), DType::f32, r);
        if (t) take_part(*t, mine[i], source, 0, spread, place);
      } else if (t) {
        // straight into the parameter where the span is all of it (the whole tensor, or a slice
        // that is one run of the whole), else into scratch and then the slice's runs from there
        const bool direct = mine[i].size() == t->into->numel();
        if (!direct && scratch.numel() < mine[i].size()) scratch = Tensor(), scratch = Tensor::zeros({mine[i].size()});
        float* into = direct ? t->into->f32() : scratch.f32();
        comm_.recv(into, mine[i].size(), DType::f32, 0);
        if (!direct) take_part(*t, mine[i], into, mine[i].first, spread, place);
      }
      if (source)  // (its pages leave this process: the page cache keeps them)
        mapped_->release(source, static_cast<uint64_t>(numel) * sizeof(float));
      if (!t || !loaded) continue;
      scratch = Tensor();  // (what loaded does may take memory: inference's packing)
      loaded(*t->p);
    }
  }

 private:
  // t <- its part of a tensor, given the tensor's floats from `first` on at `window`.
  static void take_part(const LoadTarget& t, const ShardSpan& span, const float* window, int64_t first, int spread,
                        int place) {
    if (span.size() == t.into->numel())  // the whole, or a slice that is one run of it
      std::memcpy(t.into->f32(), window + (span.first - first), static_cast<std::size_t>(span.size()) * sizeof(float));
    else
      take_shard_from(window, first, *t.into, t.p->shard_dim, t.p->shard_parts, place, spread);
  }

  // Every rank's spans, on rank 0 (empty elsewhere).
  std::vector<std::vector<ShardSpan>> spans_of_every_rank(const std::vector<ShardSpan>& mine) const {
    nlohmann::json json = nlohmann::json::array();
    for (const ShardSpan& s : mine) json.push_back({s.first, s.end});
    std::vector<std::vector<ShardSpan>> out;
    for (const std::string& part : comm_.gather_strings(json.dump(), 0)) {
      out.emplace_back();
      for (const auto& s : nlohmann::json::parse(part))
        out.back().push_back({s[0].get<int64_t>(), s[1].get<int64_t>()});
    }
    return out;
  }

  // Per tensor, on every rank: '1' where every rank takes it whole (one broadcast), '0' elsewhere.
  std::string broadcast_flags(const std::vector<std::vector<ShardSpan>>& spans) const {
    std::string flags(listing_.size(), '0');
    for (std::size_t i = 0; i < listing_.size() && comm_.rank() == 0 && comm_.size() > 1; ++i) {
      const int64_t numel = shape_numel(listing_[i].second);
      bool all_whole = true;
      for (const auto& rank : spans) all_whole = all_whole && rank[i].first == 0 && rank[i].end == numel;
      flags[i] = all_whole ? '1' : '0';
    }
    return comm_.broadcast_string(flags, 0);
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
  // the stages' first ranks form one pipeline group, whose rank 0 is rank 0
  Communicator* pipeline =
      groups.pipeline && groups.pipeline->size() > 1 && stage.rank() == 0 ? groups.pipeline : nullptr;
  const int my_stage = pipeline ? pipeline->rank() : 0;
  std::vector<SaveEntry> listing;
  std::map<std::string, int> sent_by;  // a parameter's name -> the stage that sends it
  if (stage.rank() == 0) listing = save_listing(params, spread, pipeline);
  for (const SaveEntry& e : listing) sent_by[e.name] = e.stage;

  char name[32];
  std::snprintf(name, sizeof name, "step-%06ld", static_cast<long>(state.step));
  const std::string step_dir = (fs::path(dir) / name).string();
  const std::string tmp = (fs::path(dir) / (std::string(".tmp-") + name)).string();
  Rank0Steps rank0(comm);
  std::unique_ptr<SafetensorsFileWriter> model_file, moments_file;
  rank0.run([&] {
    std::error_code ec;
    fs::create_directories(dir, ec);
    PM_IO_CHECK(!ec, "cannot create checkpoint folder {}: {}", dir, ec.message());
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    PM_IO_CHECK(!ec, "cannot create {}: {}", tmp, ec.message());
    TensorListing weights, moments;
    for (const SaveEntry& e : listing) {
      weights.emplace_back(e.name, e.shape);
      if (optimizer) moments.emplace_back("m." + e.name, e.shape), moments.emplace_back("v." + e.name, e.shape);
    }
    const std::map<std::string, std::string> model_meta{{"format", "pt"}, {"step", std::to_string(state.step)}};
    model_file = std::make_unique<SafetensorsFileWriter>(tmp + "/model.safetensors", std::move(weights), model_meta);
    if (!optimizer) return;
    const std::map<std::string, std::string> moments_meta{{"adam_steps", std::to_string(optimizer->steps_taken())}};
    moments_file =
        std::make_unique<SafetensorsFileWriter>(tmp + "/optimizer.safetensors", std::move(moments), moments_meta);
  });
  // Each tensor whole on its stage's first rank, in turn: rank 0 writes its stage's, the other
  // stages' first ranks send theirs to rank 0 (not what an earlier stage sends: the tied embedding).
  auto put = [&](const Parameter& p, const std::string& tensor_name, const Tensor& local, SafetensorsFileWriter* file) {
    with_whole(stage, local, p, spread, [&](const Tensor& whole) {
      if (sent_by.at(p.name) != my_stage) return;
      if (my_stage == 0)
        rank0.run([&] { file->append(tensor_name, whole); });
      else
        pipeline->send(whole.raw(), whole.numel(), DType::f32, 0);
    });
  };
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Parameter& p = params[i];
    put(p, p.name, *p.value, model_file.get());
    if (!optimizer) continue;
    put(p, "m." + p.name, optimizer->first_moments()[i], moments_file.get());
    put(p, "v." + p.name, optimizer->second_moments()[i], moments_file.get());
  }
  if (pipeline && my_stage == 0) {  // the other stages' tensors, in the listing's order
    auto receive = [&](const SaveEntry& e, const std::string& tensor_name, SafetensorsFileWriter* file) {
      Tensor t = Tensor::empty(e.shape);
      pipeline->recv(t.raw(), t.numel(), DType::f32, e.stage);
      rank0.run([&] { file->append(tensor_name, t); });
    };
    for (const SaveEntry& e : listing) {
      if (e.stage == 0) continue;
      receive(e, e.name, model_file.get());
      if (!optimizer) continue;
      receive(e, "m." + e.name, moments_file.get());
      receive(e, "v." + e.name, moments_file.get());
    }
  }
  rank0.run([&] {
    std::error_code ec;
    nlohmann::json s = {{"format", "pipemoe-checkpoint"}, {"version", 1}, {"step", state.step},
                        {"world_size", state.world_size}, {"config", state.config}, {"extra", state.extra}};
    model_file->finish();
    if (moments_file) moments_file->finish();
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
  if (rank0.failed()) {  // what was written of this step goes: a checkpoint is whole or absent
    model_file.reset(), moments_file.reset();
    std::error_code ec;
    fs::remove_all(tmp, ec);
  }
  rank0.agree();
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
