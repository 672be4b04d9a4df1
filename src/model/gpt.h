// A GPT-style decoder with Mixture-of-Experts feed-forward blocks, forward and backward by hand.
//
//   h0 = wte[token] + wpe[position]
//   block l: a = h + Attn(LN1(h));  h' = a + FFN(LN2(a)),  FFN dense (GeLU MLP) or MoE (every
//            moe_every-th block), causal multi-head self-attention
//   logits = LN_f(h_L) wte^T (tied), loss = mean cross-entropy + aux_coef * sum of MoE aux losses
//
// The backbone as Llama, Mixtral, DeepSeek and Qwen build it is a configuration of the same model
// (train_config.h): RMSNorm for every LN (norm "rmsnorm"), rotary embeddings of the queries and
// keys instead of wpe (position "rope"), SwiGLU dense MLPs (mlp_activation "swiglu").
//
// Each pass is one task graph: the dense work of every block is a task on the compute lane, each
// MoE layer appends its own tasks (its all-to-alls on the communication lane), and in the
// backward the data-parallel gradient all-reduce of each block joins the graph as soon as the
// block's gradients are final (set_grads_ready). One executor runs the graph, so communication
// overlaps whatever compute the dependencies allow.
//
// Experts are spread over ranks (expert parallel); everything else is replicated (data parallel):
// the replicated gradients are all-reduced, expert gradients come back complete.
//
// A pipeline stage (model/parallel_layout.h) holds a span of the blocks: the first stage the
// embeddings, the last the final norm and the tied head; its forward reads the stage before's
// output and its backward the stage after's input gradient. Its communicator is then the stage's
// ranks (the expert and data-parallel groups live inside it).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "core/parameter.h"
#include "kernels/backend.h"
#include "model/train_config.h"
#include "moe/moe_layer.h"
#include "perf/planner.h"
#include "sched/executor.h"
#include "sched/overlap.h"
#include "sched/task_graph.h"
#include "sched/trace.h"

namespace pm {

// The blocks a model holds: [first_block, end_block) (end_block -1: to the last), the embeddings
// when first_stage, the final norm and the head (tied to the token embedding) when last_stage.
struct StageSpan {
  int first_block = 0, end_block = -1;
  bool first_stage = true, last_stage = true;
};

class GptModel {
 public:
  GptModel(const ModelConfig& config, Communicator& comm, Executor& executor, Backend& backend, StageSpan span = {});
  ~GptModel();

  const ModelConfig& config() const { return config_; }
  std::vector<Parameter>& parameters() { return params_; }
  std::vector<MoeLayer*> moe_layers();
  std::vector<int> moe_blocks() const;  // the blocks moe_layers() belong to, in the same order
  // Weights from (seed, layer, global expert) streams: the same model whatever the rank count.
  void init_parameters(uint64_t seed);
  void zero_grads();

  // inputs, targets: [B, S] token ids (targets may be null: logits only). Returns this rank's mean
  // cross-entropy (nats per token). With backward_scale > 0, keeps what backward() needs;
  // backward_scale multiplies the gradient of the mean (1 / world size for data parallel).
  double forward(const int32_t* inputs, const int32_t* targets, int64_t B, float backward_scale);
  void backward();

  // A pipeline stage's passes. forward_stage: the first stage embeds inputs, the others read
  // h_in [B*S, D], the stage before's output; the last stage returns the loss (targets needed),
  // the others 0, their output in stage_output(). backward_stage: the last stage starts from the
  // loss, the others from dh_in [B*S, D], the stage after's input gradient; every stage but the
  // first leaves its own input's gradient in input_grad().
  double forward_stage(const int32_t* inputs, const float* h_in, const int32_t* targets, int64_t B, float backward_scale);
  void backward_stage(const float* dh_in);
  const float* stage_output() const { return h_.data(); }
  const float* input_grad() const { return input_grad_.data(); }
  bool vocab_parallel() const { return vocab_tp_ > 1; }
  bool first_stage() const { return span_.first_stage; }
  bool last_stage() const { return span_.last_stage; }
  // A pipeline keeps several micro-batches between their forward and their backward: stash_pass
  // moves what the last forward saved for the backward into `slot`, restore_pass moves it back
  // (the buffers themselves move: nothing is copied, and the bits are the same).
  void stash_pass(int slot);
  void restore_pass(int slot);

  // Inference with a key/value cache: start_inference(rows) makes room for `rows` sequences and
  // routes MoE tokens without a capacity (dropless: a token's output never depends on the others);
  // prefill(row, tokens, n) runs a prompt of n tokens (at most seq_len) for sequence `row` and
  // keeps its keys and values, returning the last position's logits [V]; decode(tokens) runs one
  // new token of every sequence at once, each at its own position, and returns logits [rows, V].
  // The logits are the bits a forward over the whole sequence gives at its last position.
  void start_inference(int64_t rows);
  const float* prefill(int64_t row, const int32_t* tokens, int64_t n);
  const float* decode(const int32_t* tokens);
  const float* decode_logits_end(int64_t V) const { return logits_.data() + positions_.size() * V; }
  int64_t position(int64_t row) const { return positions_[row]; }
  // Continuous batching (pipemoe serve): only the first n of the rows start_inference made room
  // for are decoded (a decode needs one at least; prefill may reach any row below n); a finished
  // sequence's row is taken over by another's (move_inference_row copies its keys, values and
  // position) so that the live ones stay first. A row's logits never depend on the other rows.
  void set_inference_rows(int64_t n);
  void move_inference_row(int64_t from, int64_t to);
  int64_t inference_capacity() const { return inference_capacity_; }
  // One sequence row of the key/value cache: every block's keys and values (grouped-query
  // attention: kv_heads / heads of multi-head's).
  int64_t kv_cache_bytes_per_row() const;
  // Prefix reuse (pipemoe serve): a prompt that begins with tokens some row's cache holds starts
  // from a copy of them. copy_inference_prefix(from, to, n) copies the keys and values of positions
  // [0, n) of row `from` into row `to`; both may be any row below the capacity, also rows beyond
  // the decoded ones, kept aside as a store, which have no position (positions are the caller's to
  // track there). extend(row, start, tokens, n) then runs n more tokens of the sequence of a decoded
  // row whose cache holds its positions [0, start), at start..start + n - 1 (start + n <= seq_len),
  // and returns the last one's logits [V]: the bits prefill of the whole prompt gives (each token
  // attends as decode would at its position; a token's rows of the dense and expert GEMMs do not
  // depend on the others).
  void copy_inference_prefix(int64_t from, int64_t to, int64_t n);
  const float* extend(int64_t row, int64_t start, const int32_t* tokens, int64_t n);
  // Several rows' extends in one pass (serve admits many prompts at once: one pass, and one
  // all-to-all per MoE layer, instead of one per prompt), on distinct rows; start 0 runs a whole
  // prompt. Returns the logits of every token run [sum of n, V], span after span in order: each
  // span's are the bits extend (and prefill) gives it alone.
  struct ExtendSpan {
    int64_t row, start;
    const int32_t* tokens;
    int64_t n;
  };
  const float* extend_many(const std::vector<ExtendSpan>& spans);

  // Inference on a memory budget: every MoE layer's routed experts stay in `where` ("host": read
  // once from model_file into host memory; "disk": model_file mapped and read in place) and at
  // most cache_slots of each layer's are resident, loaded as `mode` says (moe/expert_store.h).
  // Call before loading the checkpoint: parameters() then no longer lists the routed experts.
  void offload_experts(const std::string& where, const std::string& model_file, int cache_slots, OffloadMode mode);
  // Called while the backward graph is built, once for each block l (from the last) with the
  // tasks after which block l's replicated gradients are final, then with -1 for the rest
  // (embeddings, final norm): where the data-parallel all-reduce joins the graph.
  using GradsReady = std::function<void(TaskGraph& graph, int block, const std::vector<int>& ready)>;
  void set_grads_ready(GradsReady hook) { grads_ready_ = std::move(hook); }
  double aux_loss() const;  // sum over MoE layers, this rank's tokens
  double z_loss() const;    // router z-losses, likewise
  // Auxiliary-loss-free balancing (config router_bias_rate > 0): moves every MoE layer's selection
  // bias against the load of the last forward over all ranks (a collective: every rank calls it
  // after each training step).
  void update_balance_bias();
  // The MoE layers' last forward passes (their routing: expert load, dropped tokens), in block order.
  std::vector<const MoePass*> moe_passes() const;
  // Each MoE layer's seconds (forward, backward) in the passes since the last call, in block
  // order: from its first task's start to its last task's end, the slowest rank's, summed over the
  // passes (micro-batches). What the online degree tuning times (perf/degree_tuner.h).
  std::vector<std::pair<double, double>> take_moe_seconds();
  const float* logits() const { return logits_.data(); }  // [B*S, V] of the last forward
  // Records the tasks of the next passes (null: stop).
  void set_trace(Trace* trace) { trace_ = trace; }

  // Milliseconds of the last forward + backward in which the compute lane waited for
  // communication (each graph's wall time minus its compute lane's busy time).
  // The group an MoE layer's experts are spread over: the tensor-parallel group (ppmoe), or all ranks.
  Communicator& expert_group() { return tp_group_ ? *tp_group_ : comm_; }
  // ppmoe: the ranks that hold this rank's experts too, one per tensor-parallel group (their
  // gradients are summed over it); null when every expert lives on one rank (ep).
  Communicator* expert_replicas() { return expert_replicas_.get(); }
  double exposed_comm_ms() const { return forward_exposed_ms_ + backward_exposed_ms_; }
  double forward_exposed_ms() const { return forward_exposed_ms_; }
  double backward_exposed_ms() const { return backward_exposed_ms_; }
  // The MoE all-to-alls of the last forward + backward, and how much of their time ran while the
  // compute lane computed (ScMoE's "communication hidden"): over all MoE blocks, and per block.
  Overlap comm_hidden() const;
  const std::map<int, Overlap>& comm_hidden_by_block() const { return hidden_by_block_; }
  // ScMoE: how many dense tasks each MoE block's experts waited behind in the last passes (by block).
  const std::map<int, int>& forward_slots() const { return slots_fwd_; }
  const std::map<int, int>& backward_slots() const { return slots_bwd_; }
  // ScMoE with a profile: before each pass, every MoE block's slot and pipeline degree together
  // are those of the shortest window the planner predicts (perf/planner.h: the layer's tasks as
  // the profile predicts them, the dense tasks as the last pass measured them), instead of the
  // balancing rule at a fixed degree. The profile must outlive the model; null: stop.
  void plan_windows_with(const PerfProfile* profile) { window_profile_ = profile; }
  // The last windows planned (by block; empty without a profile or before a pass was measured).
  const std::map<int, WindowPlan>& forward_windows() const { return windows_fwd_; }
  const std::map<int, WindowPlan>& backward_windows() const { return windows_bwd_; }

 private:
  struct Block;
  struct SavedPass;
  void swap_pass(SavedPass& saved);
  // What the last pass of a direction measured: each task's duration by name, and each MoE
  // block's communication before and after its experts: the inputs of ScMoE's slot rule.
  struct PassTiming {
    std::map<std::string, double> task_s;
    std::map<int, std::pair<double, double>> moe_comm_s;
    std::map<int, Overlap> moe_hidden;  // per MoE block
    std::map<int, double> moe_span_s;   // per MoE block: first task's start to last task's end
    bool agreed = true;                 // every rank holds the same values (agree_on_timings)
  };
  void add_param(const std::string& name, Tensor& value, Tensor& grad, bool expert, bool decay);
  // Runs a pass's graph; returns the milliseconds its compute lane waited for communication.
  double run(TaskGraph& graph, const char* category);
  // A forward of B sequences of S tokens (decode: one token per sequence, against the cache;
  // cache_row >= 0: keep the keys and values of this one sequence in that row of the cache).
  double run_forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S, float backward_scale,
                     int64_t cache_row, bool decode, const float* h_in = nullptr);
  // A dense step: first then rest as one compute task; with the dense weights split over the
  // tensor-parallel group (dense_tp_ > 1), first, the sum of partial[count] over the group on the
  // communication lane, then rest. Returns the last task's id.
  int add_dense_task(TaskGraph& g, const std::string& name, const char* cost, TaskWork work, std::vector<int> deps,
                     std::function<void()> first, Buffer<float>* partial, int64_t count, std::function<void()> rest);
  // y = x w + b, or, with the dense weights split, this rank's share of it (x w with its rows of
  // w; the bias from the group's first rank only), summed over the group afterwards.
  void linear_forward_share(Backend& k, RowsIn x, const Tensor& w, const Tensor& b, int64_t T, float* y) const;
  // Inference: each dense weight packed once at start_inference (the weights no longer change), by
  // tensor; the LM head's (wte used transposed) too. Null while training.
  const PackedMatrix* frozen_pack(const Tensor& w) const;
  std::map<const Tensor*, std::unique_ptr<PackedMatrix>> frozen_packs_;
  bool holds(int l) const { return l >= span_.first_block && l < span_.end_block; }
  // This rank's times of the pass just run, to be agreed on before they are read.
  void remember(const TaskGraph& graph, const std::map<int, PassTasks>& moe_tasks, PassTiming& timing) const;
  // Makes each timing not yet agreed on every rank's same, each value the slowest rank's, in one
  // all-reduce, and adds its MoE spans to moe_seconds_: the choices made from the times (ScMoE's
  // slots, where the gradient buckets go, the pipeline degrees) are then the same on every rank,
  // and so is the order in which every rank adds its collectives. Called where the times are read,
  // not after each pass: an all-reduce between a forward and its backward made the rank done first
  // wait for the other there (up to 5 ms a step of configs/deepseek.json), where the next
  // all-to-all would otherwise have absorbed the difference.
  void agree_on_timings(bool forward, bool backward);
  bool tap_is(int block, const char* position) const;
  // Of the dense tasks that may sit between an MoE block's dispatch and its experts, how many
  // do: the configuration's scmoe_slot, else ScMoE's balancing rule on the last pass's times.
  // With a profile, the window planner's slot, and it sets the layer's degree for the pass.
  int choose_slot(int block, bool forward, const std::vector<std::string>& candidates);
  const float* scmoe_tap_now(int block);
  const float* scmoe_tap_saved(int block) const;
  void shared_expert_hidden(Block& b, Backend& k, int64_t T, int64_t G);
  void shared_expert_forward(Block& b, Backend& k, int64_t T, int64_t D, int64_t G);
  void shared_expert_backward(Block& b, Backend& k, const float* dout, int64_t T, int64_t D, int64_t G, float* dx);

  ModelConfig config_;
  StageSpan span_;  // end_block resolved
  // The dense GEMMs' precision (config "dtype"): the linear layers, the shared expert and the
  // LM head; attention's score and value products, LayerNorm, softmax and the loss stay fp32.
  Precision precision_ = Precision::fp32;
  Trace* trace_ = nullptr;
  GradsReady grads_ready_;
  Communicator& comm_;
  // ppmoe: this rank's tensor-parallel group (its MoE layers' group) and the ranks of the other
  // groups at the same place in theirs (which hold the same experts); null otherwise
  std::unique_ptr<Communicator> tp_group_, expert_replicas_;
  // The ranks over which the dense blocks' attention heads and MLP columns are split (config
  // dense_tp(): ppmoe with tp_dense "split"); 1: every rank holds them whole.
  int dense_tp_ = 1;
  // The ranks over which the tied embedding's rows (the vocabulary) are split: dense_tp_ when
  // it divides the vocabulary, else 1. Split: the lookup and the head's logits each rank's share
  // of the vocabulary, the cross-entropy's max and sums reduced over the group (Megatron-LM's
  // vocabulary-parallel embedding and loss).
  int vocab_tp_ = 1;
  Buffer<float> ce_max_;        // vocabulary-parallel loss: each row's max logit [T]
  std::vector<double> ce_sums_;  // and each row's sum of exp(z - max), its target's logit [2T]
  Executor& executor_;
  Backend& backend_;
  Tensor wte_, wpe_, lnf_g_, lnf_b_;  // [V, D], [S, D] (learned positions), [D], [D] (LayerNorm)
  // rotary embeddings (config position "rope"): each position's angles' cos and sin [S, hd / 2]
  std::vector<float> rope_cos_, rope_sin_;
  bool mlp_swiglu() const { return config_.mlp_activation == "swiglu"; }
  int64_t kv_width() const { return config_.d_model / config_.heads * config_.kv_heads_or_all(); }  // Dkv
  // w_qkv's columns [q | k | v] in proportion: {1, 1, 1}, or {heads, kv_heads, kv_heads} (grouped-query)
  std::vector<int> qkv_parts() const {
    const int kv = config_.kv_heads_or_all();
    return kv == config_.heads ? std::vector<int>{1, 1, 1} : std::vector<int>{config_.heads, kv, kv};
  }
  // rotary embeddings of the queries and keys of qkv[T, Dl + 2 Dkvl] (pos null: token t at t % S); inverse: a gradient's
  void rope(Backend& k, float* qkv, int64_t T, const int64_t* pos, int64_t S, bool inverse) const;
  Tensor dwte_, dwpe_, dlnf_g_, dlnf_b_;
  std::vector<std::unique_ptr<Block>> blocks_;  // [layers]: null where another stage holds the block
  std::map<int, std::unique_ptr<SavedPass>> stashed_;
  Buffer<float> input_grad_;  // not the first stage: the gradient of the stage's input [T, D]
  std::vector<Parameter> params_;

  // Activations of the last forward (T = B * S rows).
  int64_t B_ = 0, T_ = 0;
  float backward_scale_ = 0;
  std::vector<int32_t> inputs_, targets_;
  Buffer<float> h_, h_final_, lnf_out_, lnf_mean_, lnf_rstd_;  // [T, D], [T, D], [T, D], [T], [T]
  Buffer<float> logits_, dlogits_;                             // [T, V]
  double loss_ = 0;
  double forward_exposed_ms_ = 0, backward_exposed_ms_ = 0;
  PassTiming last_forward_, last_backward_;
  std::map<int, std::pair<double, double>> moe_seconds_;  // per MoE block, since take_moe_seconds
  std::vector<int64_t> positions_;  // inference: each sequence's next position (the rows decoded)
  // A pass against the cache (decode, extend): each token's cache row and position
  std::vector<int64_t> token_rows_, token_positions_;
  int64_t inference_capacity_ = 0;  // inference: the rows the key/value caches hold
  std::map<int, Overlap> hidden_by_block_;  // forward + backward
  std::map<int, int> slots_fwd_, slots_bwd_;
  const PerfProfile* window_profile_ = nullptr;
  std::map<int, WindowPlan> windows_fwd_, windows_bwd_;
};

}  // namespace pm
