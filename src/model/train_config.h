// The training configuration: one flat JSON object (see configs/demo.json), every key optional,
// unknown keys and impossible values rejected with a message that names them. Command-line flags
// override keys (`--set key=value` for any, `--max-steps` etc. for the common ones).
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/tensor.h"

namespace pm {

struct ModelConfig {
  int vocab_size = 0;  // set from the tokenizer
  int seq_len = 128;
  int d_model = 256;
  int layers = 4;
  int heads = 4;
  // Key/value heads (grouped-query attention: each shared by heads / kv_heads query heads, the
  // key/value cache kv_heads / heads the size); 0: as many as heads (multi-head attention).
  int kv_heads = 0;
  int kv_heads_or_all() const { return kv_heads > 0 ? kv_heads : heads; }
  int mlp_hidden = 1024;   // dense feed-forward blocks
  // The dense backbone's design. norm: "layernorm" (GPT-2: mean and bias) or "rmsnorm" (Llama,
  // Mixtral, DeepSeek, Qwen: no mean, no bias), every norm of the model (eps 1e-5 either way).
  // position: "learned" (a position embedding added to the token's) or "rope" (rotary embeddings
  // of the queries and keys, rotate-half pairing, base rope_theta; no position embedding).
  // mlp_activation: the dense MLP blocks', "gelu" or "swiglu" (w_fc [D, 2F] = [W_g | W_v]).
  std::string norm = "layernorm";
  std::string position = "learned";
  double rope_theta = 10000;
  std::string mlp_activation = "gelu";
  bool rmsnorm() const { return norm == "rmsnorm"; }
  bool rope() const { return position == "rope"; }
  int moe_every = 2;       // every moe_every-th block has an MoE feed-forward (blocks 1, 3, ...); 0: none
  // Blocks at the start that stay dense, moe_every counted from the first after them (DeepSeek-V3's
  // first_k_dense_replace: 3 of 61, with moe_every 1)
  int first_dense_blocks = 0;
  int experts = 4;         // over all ranks
  int top_k = 2;
  double capacity_factor = 1.25;
  std::string drop_policy = "position";  // which choices a full expert drops: "position" or "probs" (routing.h)
  int expert_hidden = 1024;
  std::string expert_activation = "gelu";  // the routed experts': "gelu" or "swiglu" (moe_shape.h)
  std::string shared_expert_activation = "gelu";  // the shared expert's: "gelu" or "swiglu" (W_fc [D, 2G])
  std::string moe_strategy = "ep";  // how tokens reach their experts (moe/moe_layer.h): "ep", all-to-all;
                                    // "ppmoe": split over a tensor-parallel group of tp ranks
  // Ranks per tensor-parallel group (PPMoE): tp consecutive ranks hold the same sequences and split
  // every MoE layer's experts; dp = ranks / (tp x pp) groups each take their own batch.
  int tp = 1;
  // ppmoe with tp > 1, the dense blocks: "split" Megatron-style (attention heads and MLP columns
  // over the group, one all-reduce after attention and one after the MLP, mirrored in the
  // backward), or "replicate" (every rank of the group computes them whole: no all-reduce, tp
  // times the dense work; the one-rank run's bits). Embeddings, norms and the shared expert are
  // replicated either way.
  std::string tp_dense = "split";
  // The dense blocks' tensor-parallel ranks (1 unless ppmoe with tp_dense split).
  int dense_tp() const { return moe_strategy == "ppmoe" && tp_dense == "split" ? tp : 1; }
  // "moe": an MoE block's routed experts read its own LN2 output; "scmoe" (shortcut-connected,
  // ScMoE): they read, through a LayerNorm of their own, the block before it at scmoe_tap, so
  // their all-to-all overlaps the dense work in between.
  std::string arch = "moe";
  std::string scmoe_tap = "pos2";  // pos1: the preceding block's output; pos2: its attention output; pos3: its input
  int scmoe_slot = -1;             // dense tasks between the dispatch and the experts; -1: the balancing rule
  int shared_expert_hidden = 0;    // > 0: a dense shared expert beside the routed ones in every MoE block
  bool coef_gate = false;          // scale the shared expert per token by sigmoid(x . w_cg + b_cg)
  double aux_coef = 0.01;  // weight of the sum of the MoE layers' aux losses
  // "gshard": each layer's balance loss over a rank's tokens of the pass; "sequence": DeepSeek-V3's
  // sequence-wise loss, over each sequence and averaged (moe_shape.h aux_seq_len)
  std::string aux_loss = "gshard";
  double z_loss_coef = 0;  // weight of the sum of the MoE layers' router z-losses (ST-MoE; 1e-3 there)
  bool gate_normalize = true;  // top-k > 1: gate values divided by their sum (moe_shape.h normalize_gates)
  double routed_scaling_factor = 1.0;  // the gate values times this (DeepSeek-V3: 2.5; moe_shape.h routed_scale)
  std::string router_score = "softmax";  // or "sigmoid" (DeepSeek-V3; moe_shape.h RouterScore)
  // Group-limited routing (DeepSeek-V3's n_group, topk_group; moe_shape.h route_groups): the
  // experts in route_groups groups, a token's k chosen within its route_top_groups best (0: all)
  int route_groups = 1;
  int route_top_groups = 0;
  bool group_limited() const { return route_top_groups > 0 && route_top_groups < route_groups; }
  // "fp32", or "bf16": every GEMM but attention's own products on bf16 operands with fp32
  // accumulation, the all-to-all payloads in bf16; weights, gradients, optimizer state, LayerNorm,
  // softmax, router and loss fp32 (kernels/backend.h Precision, moe_shape.h)
  std::string dtype = "fp32";
  // > 0: auxiliary-loss-free balancing (DeepSeek-V3, which uses 1e-3): each MoE layer chooses by
  // probability + a per-expert bias, moved by this much after every step against the load
  double router_bias_rate = 0;
  // Top-k > 1: the expert-parallel dispatch sends a token's row once per rank (moe_shape.h
  // dedup_dispatch): the same results, fewer bytes on the wire; false: once per chosen expert.
  bool dedup_dispatch = true;
  // "none", or "experts": the MoE layers' routed experts (moe_shape.h recompute_experts) and the
  // blocks' shared experts keep only their inputs from the forward and make the rest again in the
  // backward: the same results, less memory held between a layer's forward and its backward, more
  // arithmetic
  std::string recompute = "none";
  bool recompute_experts() const { return recompute == "experts"; }
  bool is_moe(int layer) const {
    return moe_every > 0 && layer >= first_dense_blocks && (layer - first_dense_blocks) % moe_every == moe_every - 1;
  }
  bool scmoe() const { return arch == "scmoe"; }
  // The ranks an MoE layer's experts are spread over: the tensor-parallel group (ppmoe) or all.
  int expert_ranks(int world) const { return moe_strategy == "ppmoe" ? tp : world; }
  // Ranks that hold the same sequences: a tensor-parallel group (ppmoe), else 1. A rank's batch is
  // its group's: group rank / this draws it.
  int ranks_per_batch() const { return moe_strategy == "ppmoe" ? tp : 1; }
  int moe_layers() const;
};

struct TrainConfig {
  ModelConfig model;
  int batch_size = 16;  // sequences per rank per step (ppmoe: per tensor-parallel group, whose ranks share them)
  int dp = 0;           // data-parallel groups: 0 = ranks / (tp x pp); else must be that
  // Pipeline stages (model/parallel_layout.h): the blocks split over pp groups of tp x dp ranks,
  // activations and gradients passed stage to stage.
  int pp = 1;
  // Micro-batches of batch_size sequences per step, their gradients summed before one update (with
  // one pipeline stage: gradient accumulation). Each is routed on its own, with its own capacity.
  int micro_batches = 1;
  // The stages' order of forwards and backwards (model/pipeline_schedule.h): "1f1b" or "gpipe".
  std::string pipeline_schedule = "1f1b";
  // Which blocks each stage holds (model/stage_split.h): "even", "cost", or blocks per stage "3,1".
  std::string pipeline_split = "even";
  int max_steps = 300;
  int stop_at = 0;  // stop after this many steps, as an interruption would (the schedule still follows max_steps)
  double lr = 3e-3, min_lr = 3e-4;
  int warmup_steps = 30;
  double weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8, grad_clip = 1.0;
  bool overlap_grad_allreduce = true;  // all-reduce each block's gradients while the backward goes on
  int eval_every = 50, eval_batches = 8, log_every = 10;
  uint64_t seed = 1;
  std::string data = "data/brown";  // a Brown corpus folder, or a plain-text file
  int tokenizer_vocab = 2048;       // BPE vocabulary trained on the training split
  std::string save;                 // checkpoint folder ("" = none)
  int save_every = 0;               // steps between checkpoints (0: only at the end)
  std::string resume;               // checkpoint folder to continue from
  // The data-parallel gradient all-reduce's wire format: "fp32", or "bf16" for half the bytes
  // (each gradient summed from bf16 roundings in float32, rounded to bf16; comm/bf16_allreduce.h).
  std::string grad_allreduce_dtype = "fp32";
  // The order bf16 GEMMs sum in (kernels/cpu/gemm.h): "dot", "amx" or "auto" (amx where every rank
  // has AMX); "" keeps pipemoe's --bf16-order (dot unless given). Applied by the train command
  // before the model is built; checkpoints record the order that ran.
  std::string bf16_order;
  DType grad_wire() const { return grad_allreduce_dtype == "bf16" ? DType::bf16 : DType::f32; }
  std::string degree = "1";         // MoE pipeline degree: a number or "auto"
  // degree auto with a profile: each MoE layer's degrees planned again from its own routing after
  // the first step and every this many steps (0: never; the first layer's choice for all)
  int degree_replan_every = 50;
  // With those plans: time each layer's closest candidates on the training steps and keep the
  // fastest (model/layer_degrees.h): "auto" where predicted to cost under 1% of the rest of the
  // run, "on", "off". degree_tune_rounds: rounds of trials (each candidate once per round);
  // degree_tune_window: the planner's candidates predicted within this share of its fastest
  // are timed (at most 3 per direction; 0.15: the models' misses measured per direction).
  std::string degree_tune = "auto";
  int degree_tune_rounds = 3;
  double degree_tune_window = 0.15;
  // ScMoE with degree auto and a profile: "window" plans each block's slot and degree together
  // (perf/planner.h plan_window); "rule": the degree from the layer alone, the slot by the rule.
  std::string scmoe_plan = "window";
  // A step whose loss or gradients are not finite: "stop" the run naming where, or "skip" its
  // update (10 in a row stop the run).
  std::string nan_policy = "stop";
  std::string profile;              // performance profile for degree auto
  std::string trace;                // Chrome trace of the last logged step
  // The last N steps' tasks summed per name at the end (model/task_times.h): a table of where a
  // step goes, and `step_breakdown_ms` in the final JSON (0: none)
  int64_t breakdown_steps = 0;
  std::string log_csv;              // per-step CSV ("" = <save>/log.csv or out/train_log.csv)
  std::string plot;                 // loss-curve PNG ("" = next to the CSV; "none": no PNG)

  nlohmann::json to_json() const;
  // Applies keys of j (a config file or overrides); throws on unknown keys and bad types. Relative
  // paths (data, save, resume, profile, trace, log_csv, plot) are taken relative to base_dir when
  // it is given (a configuration file's folder), else left relative to the current directory.
  void apply(const nlohmann::json& j, const std::string& source, const std::string& base_dir = "");
  void validate(int world_size) const;
  // What a rank of a run of this configuration holds at its peak, roughly (validate refuses a
  // configuration that needs more than the machine has).
  double estimated_bytes_per_rank(int world_size) const;
};

double physical_memory_bytes();  // 0 if unknown

// A configuration file; its relative paths are relative to the file's folder.
TrainConfig load_train_config(const std::string& path);
// The same from text (source names it in errors).
TrainConfig parse_train_config(const std::string& text, const std::string& source, const std::string& base_dir = "");
// --set key=value into overrides: the value as JSON when it parses (numbers, true), else a string.
void apply_set_option(nlohmann::json& overrides, const std::string& kv);

}  // namespace pm
