// Which rank does what: the tp x dp x pp layout of a training run, and the groups it needs.
//
// Ranks are numbered the way Megatron-LM numbers them, tensor-parallel fastest, then data, then
// pipeline: rank = tp_rank + tp * (dp_rank + dp * stage). A tensor-parallel group is tp
// consecutive ranks (one host, where the fast link is); a pipeline stage is tp x dp consecutive
// ranks; the ranks of one pipeline (same tp_rank and dp_rank, one per stage) are tp x dp apart.
//
// Stage s holds blocks [first_block(s), end_block(s)): by default the L blocks split as evenly as
// they go, the earlier stages taking the shorter share, or as model/stage_split.h says (the first
// stage holds the embeddings, the last the head).
// The tied token embedding lives on both the first and the last stage; their gradients are summed
// over the embedding group (the two ends of a pipeline) before the update, as in Megatron-LM.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace pm {

struct ParallelLayout {
  int world = 1, tp = 1, dp = 1, pp = 1;
  int layers = 1;

  std::vector<int> starts;  // [pp + 1]: each stage's first block, then layers

  // world = tp x dp x pp; layers >= pp; starts (empty: even) as stage_starts gives them. Usage
  // errors otherwise.
  static ParallelLayout make(int world, int tp, int pp, int layers, std::vector<int> starts = {});

  int tp_rank(int rank) const { return rank % tp; }
  int dp_rank(int rank) const { return (rank / tp) % dp; }
  int stage(int rank) const { return rank / (tp * dp); }
  int stage_size() const { return tp * dp; }
  int first_block(int stage) const { return starts[stage]; }
  int end_block(int stage) const { return starts[stage + 1]; }
  // The rank at (tp_rank, dp_rank, stage).
  int rank_at(int tp_rank, int dp_rank, int stage) const { return tp_rank + tp * (dp_rank + dp * stage); }

  // Megatron's layout printout: one line per rank with its tp, dp and pp place, its blocks and
  // whether it holds the embeddings and the head.
  std::vector<std::string> table() const;
};

// This rank's communicators for a layout. Collective over `world` (every rank creates them all).
struct ParallelGroups {
  std::unique_ptr<Communicator> stage;     // the tp x dp ranks of this rank's stage
  std::unique_ptr<Communicator> pipeline;  // the pp ranks of this rank's pipeline, in stage order
  // The first and the last stage of this rank's pipeline (pp > 1); null on the stages between,
  // and with pp 1 (one rank holds both ends).
  std::unique_ptr<Communicator> embedding;
  static ParallelGroups make(Communicator& world, const ParallelLayout& layout);
};

}  // namespace pm
