// The one description of an MoE layer's shape: what the layer is built from, what the planner
// predicts, what the profiler measures and what the commands take as flags.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/backend.h"
#include "moe/routing.h"

namespace pm {

enum class RouterScore { softmax, sigmoid };
// "softmax" or "sigmoid", else a usage error naming `what`.
RouterScore parse_router_score(const std::string& name, const std::string& what);

struct MoeShape {
  int64_t tokens = 0;     // T: tokens per rank in one pass
  int64_t model_dim = 0;  // M
  int64_t hidden = 0;     // H: each expert's hidden size (SwiGLU: of each of its two halves)
  int experts = 0;        // E: over all ranks of the expert group
  int top_k = 1;          // k: experts per token
  double capacity_factor = 1.0;  // f: capacity C = ceil(k f T / E) slots per expert and rank; 0: dropless
  int ranks = 1;          // P: the ranks that share the experts, E / P each
  DropPolicy drop_policy = DropPolicy::position;  // which choices a full expert drops (routing.h)
  // Routing variants (they change what the layer computes, not its cost):
  // top-k > 1: the chosen probabilities divided by their sum (GShard, Mixtral, DeepSeek-V3), or
  // as they are (Qwen3-MoE's norm_topk_prob = false). Top-1 is never normalised: a gate of 1
  // would cut the router off from the loss (Switch).
  bool normalize_gates = true;
  // The gate values multiplied by this after any normalisation (DeepSeek-V3's routed_scaling_factor,
  // 2.5 there): the routed experts' sum weighs that much beside the shared expert and the residual.
  double routed_scale = 1.0;
  // Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the probabilities
  // to choose the experts only (the gate values stay the probabilities). The layer holds it as the
  // parameter "router_bias" [E] that no gradient moves; training updates it from the load
  // (gate.h update_balance_bias).
  bool balance_bias = false;
  // The router's scores: softmax over the experts (GShard, Switch, Mixtral), or each expert's own
  // sigmoid (DeepSeek-V3: scores that do not compete, normalised over the chosen k by
  // normalize_gates; its balance losses see them normalised over all experts).
  RouterScore router_score = RouterScore::softmax;
  // The balance loss (gate.h aux_loss): 0, GShard's over the pass's tokens (the share of tokens
  // whose first choice is each expert); > 0, DeepSeek-V3's sequence-wise loss over each run of this
  // many tokens (a sequence: the share of its k choices per token that chose each expert), averaged
  // over the runs, so that no single sequence leans on a few experts.
  int64_t aux_seq_len = 0;
  // Group-limited routing (DeepSeek-V3's n_group and topk_group, V2's device-limited routing): the
  // experts fall into route_groups groups of consecutive experts, each scored per token by the sum
  // of its two best selection scores (its one score when a group has one expert), and a token
  // chooses its k experts within its route_top_groups best groups only (ties to the lower group).
  // With route_groups a multiple of the ranks every group sits on one rank, so a token's row
  // travels to at most route_top_groups ranks: the deduplicated dispatch sends fewer rows.
  // route_top_groups 0: every group (no limit).
  int route_groups = 1;
  int route_top_groups = 0;
  bool group_limited() const { return route_top_groups > 0 && route_top_groups < route_groups; }
  Activation activation = Activation::gelu;  // the experts' (kernels/backend.h)
  // bf16: the experts' GEMMs read bf16 operands (kernels/backend.h, Precision) and the all-to-all
  // payloads travel as bf16 (half the bytes); the router, the gate values, the combine's sums and
  // the weight gradients stay fp32.
  Precision precision = Precision::fp32;
  // Top-k > 1: the expert-parallel dispatch sends a token's row once per rank, however
  // many of that rank's experts it chose (moe/unique_rows.h): the same bits, fewer bytes. What the
  // layer computes and the planner's cost model are unchanged (it counts every row).
  bool dedup_dispatch = true;
  // Activation recomputation for the routed experts (Megatron-Core's MoE layer recompute): the
  // forward keeps only the experts' inputs, and the backward runs each expert's first GEMM and
  // activation again for its rows before their input gradients (same kernels, same rows: the same
  // bits). A pass keeps rows x (M) of the forward's values where it kept rows x (M + H1 + H)
  // (the pre-activations or GeLU's derivative, and the activations), for a third more expert
  // arithmetic in the backward (GeLU: the first GEMM's half of the forward; SwiGLU: two thirds).
  bool recompute_experts = false;
  int64_t wire_bytes() const { return precision == Precision::bf16 ? 2 : 4; }  // per value of a row on the wire
  int64_t fc1_width() const { return pm::fc1_width(activation, hidden); }  // W1's columns: H, or 2H for SwiGLU
  // Multiply-adds x 2 of one row through one expert, forward: 2 M H1 + 2 H M.
  double expert_flops_per_row() const { return 2.0 * model_dim * (fc1_width() + hidden); }

  // Throws a usage error naming the first impossible value (sizes not positive, k outside 1..E,
  // f not positive, experts that do not divide over the ranks or into the route groups, more
  // choices than the allowed groups hold).
  void validate() const;
  int local_experts() const { return experts / ranks; }
  int64_t capacity() const;
  // A pipeline degree this shape can run (1 up to the capacity), or a usage error that says so;
  // `what` names it for the message ("--degree", "configuration: degree").
  void check_degree(int degree, const std::string& what = "pipeline degree") const;
  // The same layer on another number of tokens per rank.
  MoeShape with_tokens(int64_t t) const {
    MoeShape s = *this;
    s.tokens = t;
    return s;
  }
  // "T=2048 M=512 H=1024 E=8 k=2 f=1.25 P=2" (+ " drop-probs", " raw-gates", " scale 2.5", " bias", " sigmoid", " groups 2 of 4",
  // " swiglu", " bf16", " no-dedup", " recompute")
  std::string str() const;
};

// "position" or "probs"; a usage error naming `what` for anything else.
DropPolicy parse_drop_policy(const std::string& name, const std::string& what);
// "gelu" or "swiglu"; a usage error naming `what` for anything else.
Activation parse_activation(const std::string& name, const std::string& what = "activation");
const char* activation_name(Activation a);
// "fp32" or "bf16"; a usage error naming `what` for anything else.
Precision parse_precision(const std::string& name, const std::string& what = "dtype");
const char* precision_name(Precision p);

}  // namespace pm
