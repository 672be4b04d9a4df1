// Checkpoints: save and resume a training run exactly.
//
// A checkpoint is a folder DIR/step-000100/ with
//   model.safetensors      every parameter; expert tensors gathered to their global shape [E, ...]
//   optimizer.safetensors  AdamW's moments, "m.<name>" and "v.<name>", the same way
//   state.json             step, configuration, world size, data fingerprint
//   tokenizer.json
// written into a temporary folder, flushed, then renamed into place; DIR/latest names the newest
// and is replaced atomically. A crash leaves either the old checkpoints or the new one, never half.
// Collective: every rank calls save and load; rank 0 touches the files.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "model/optimizer.h"
#include "core/parameter.h"

namespace pm {

struct CheckpointState {
  int64_t step = 0;          // steps completed
  nlohmann::json config;     // the TrainConfig as JSON
  int world_size = 1;
  std::string tokenizer_json;
  nlohmann::json extra;      // anything else the trainer keeps (data fingerprint, ...)
};

// Writes DIR/step-<step>/ and points DIR/latest at it. Returns the step folder. Every tensor is
// written whole: expert tensors of the first `expert_ranks` ranks (0: all; ppmoe: one tensor-parallel
// group, which holds every expert) concatenated in rank order, so any layout can load it.
// Pipeline stages hold different parameters: each stage gathers its own over its group (stage,
// where expert_ranks counts), and the stages' first ranks send theirs to rank 0 over their
// pipeline group (a tensor two stages hold, the tied embedding, is written once).
struct CheckpointGroups {
  Communicator* stage = nullptr;     // null: comm
  Communicator* pipeline = nullptr;  // null: one stage
};
std::string save_checkpoint(Communicator& comm, const std::string& dir, const std::vector<Parameter>& params,
                            AdamW* optimizer, const CheckpointState& state, int expert_ranks = 0,
                            CheckpointGroups groups = {});

// The step folder DIR names: DIR itself if it holds state.json, else DIR/<contents of latest>.
// Usage error if it is neither.
std::string checkpoint_step_dir(const std::string& dir);

// Reads the state of DIR (a checkpoint folder with `latest`, or a step folder) on every rank.
// state.json's text, checked: a usage Error naming `dir` for anything corrupt (what the
// fuzzer feeds).
CheckpointState parse_checkpoint_state(const std::string& text, const std::string& dir);
CheckpointState read_checkpoint_state(Communicator& comm, const std::string& dir);

// Loads parameters (and the optimizer's moments when given) from DIR into this rank's tensors,
// taking this rank's slice of every expert tensor (its place among `expert_ranks` ranks that
// spread the experts: 0 = all). Shapes must match: a usage error names the first that does not.
// loaded, if given, is called with each parameter as soon as its values are in place, on every
// rank at the same tensor (the file's order): inference packs a layer's experts there.
void load_checkpoint_tensors(Communicator& comm, const std::string& dir, std::vector<Parameter>& params, AdamW* optimizer,
                             int expert_ranks = 0, const std::function<void(const Parameter&)>& loaded = {});

}  // namespace pm
