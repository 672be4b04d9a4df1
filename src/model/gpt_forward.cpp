#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "model/gpt_internal.h"

namespace pm {

using namespace gpt_internal;  // the parts the model's source files share

double GptModel::forward(const int32_t* inputs, const int32_t* targets, int64_t B, float backward_scale) {
  PM_CHECK(span_.first_stage && span_.last_stage, "a pipeline stage runs forward_stage");
  return run_forward(inputs, targets, B, config_.seq_len, backward_scale, -1, false);
}

double GptModel::forward_stage(const int32_t* inputs, const float* h_in, const int32_t* targets, int64_t B,
                               float backward_scale) {
  PM_CHECK(span_.first_stage ? inputs != nullptr : h_in != nullptr, "a stage's forward needs its input");
  PM_CHECK(!span_.last_stage || targets || backward_scale == 0, "the last stage's forward needs targets to train");
  return run_forward(inputs, targets, B, config_.seq_len, backward_scale, -1, false, h_in);
}

void GptModel::start_inference(int64_t rows) {
  PM_REQUIRE(rows >= 1, "inference needs at least one sequence, got {}", rows);
  const int64_t S = config_.seq_len, Dkv = kv_width();
  PM_CHECK(span_.first_stage && span_.last_stage && dense_tp_ == 1, "inference runs on a whole model");
  for (auto& b : blocks_) {
    b->k_cache.assign(rows * S * Dkv, 0.0f);
    b->v_cache.assign(rows * S * Dkv, 0.0f);
    if (b->moe) {
      b->moe->set_capacity_factor(0);  // dropless: a token's output never depends on the others
      b->moe->set_inference();
    }
  }
  positions_.assign(rows, 0);
  inference_capacity_ = rows;
  // the weights are final from here on: pack the dense ones once (decode runs a token per
  // sequence, where packing a weight costs more than the GEMM); the experts' packings are kept
  // by their layers while the weights do not change (moe/layer_weights.h)
  frozen_packs_.clear();
  auto pack = [&](const Tensor& w, Trans trans) {
    const int64_t rows_w = w.dim(0), cols_w = w.dim(1);
    frozen_packs_[&w] = trans == Trans::no ? backend_.pack_matrix(precision_, Trans::no, rows_w, cols_w, w.f32(), cols_w)
                                           : backend_.pack_matrix(precision_, Trans::yes, cols_w, rows_w, w.f32(), cols_w);
  };
  for (auto& b : blocks_) {
    if (!b) continue;
    for (const Tensor* w : {&b->w_qkv, &b->w_proj}) pack(*w, Trans::no);
    if (!b->moe) for (const Tensor* w : {&b->w_fc, &b->w_out}) pack(*w, Trans::no);
  }
  pack(wte_, Trans::yes);
}

int64_t GptModel::kv_cache_bytes_per_row() const {
  int64_t blocks = 0;
  for (const auto& b : blocks_) blocks += b != nullptr;
  return blocks * 2 * config_.seq_len * kv_width() * static_cast<int64_t>(sizeof(float));
}

const float* GptModel::prefill(int64_t row, const int32_t* tokens, int64_t n) {
  PM_CHECK(row >= 0 && row < static_cast<int64_t>(positions_.size()), "row {} of {} sequences", row, positions_.size());
  PM_REQUIRE(n >= 1 && n <= config_.seq_len, "a prompt of {} tokens: the model takes 1 to {}", n, config_.seq_len);
  run_forward(tokens, nullptr, 1, n, 0.0f, row, false);
  positions_[row] = n;
  return logits_.data() + (n - 1) * config_.vocab_size;
}

void GptModel::set_inference_rows(int64_t n) {
  PM_CHECK(n >= 0 && n <= inference_capacity_, "{} rows of inference; room for 0 to {}", n, inference_capacity_);
  positions_.resize(n, 0);
}

void GptModel::move_inference_row(int64_t from, int64_t to) {
  const int64_t rows = static_cast<int64_t>(positions_.size());
  PM_CHECK(from >= 0 && from < rows && to >= 0 && to < rows, "moving row {} to {} of {}", from, to, rows);
  if (from == to) return;
  const int64_t span = config_.seq_len * kv_width();  // one row of a block's cache
  for (auto& b : blocks_) {
    std::copy_n(b->k_cache.data() + from * span, span, b->k_cache.data() + to * span);
    std::copy_n(b->v_cache.data() + from * span, span, b->v_cache.data() + to * span);
  }
  positions_[to] = positions_[from];
}

void GptModel::copy_inference_prefix(int64_t from, int64_t to, int64_t n) {
  const int64_t S = config_.seq_len, Dkv = kv_width();
  PM_CHECK(from >= 0 && from < inference_capacity_ && to >= 0 && to < inference_capacity_,
           "copying row {} to {} of {}", from, to, inference_capacity_);
  PM_CHECK(n >= 0 && n <= S, "copying {} positions of a window of {}", n, S);
  if (from == to) return;
  for (auto& b : blocks_) {
    for (int64_t i = 0; i < Dkv; ++i)  // keys transposed: [row][Dkv][S]
      std::copy_n(b->k_cache.data() + (from * Dkv + i) * S, n, b->k_cache.data() + (to * Dkv + i) * S);
    std::copy_n(b->v_cache.data() + from * S * Dkv, n * Dkv, b->v_cache.data() + to * S * Dkv);
  }
}

const float* GptModel::extend(int64_t row, int64_t start, const int32_t* tokens, int64_t n) {
  return extend_many({{row, start, tokens, n}}) + (n - 1) * config_.vocab_size;
}

const float* GptModel::extend_many(const std::vector<ExtendSpan>& spans) {
  token_rows_.clear();
  token_positions_.clear();
  std::vector<int32_t> tokens;
  std::vector<bool> seen(positions_.size(), false);
  for (const ExtendSpan& s : spans) {
    PM_CHECK(s.row >= 0 && s.row < static_cast<int64_t>(positions_.size()) && !seen[s.row],
             "row {} of {} sequences, once per pass", s.row, positions_.size());
    PM_REQUIRE(s.start >= 0 && s.n >= 1 && s.start + s.n <= config_.seq_len,
               "extending a sequence at position {} by {} tokens: the model's window is {}", s.start, s.n,
               config_.seq_len);
    seen[s.row] = true;
    for (int64_t i = 0; i < s.n; ++i) token_rows_.push_back(s.row), token_positions_.push_back(s.start + i);
    tokens.insert(tokens.end(), s.tokens, s.tokens + s.n);
  }
  if (tokens.empty()) return logits_.data();
  run_forward(tokens.data(), nullptr, static_cast<int64_t>(tokens.size()), 1, 0.0f, -1, true);
  for (const ExtendSpan& s : spans) positions_[s.row] = s.start + s.n;
  return logits_.data();
}

const float* GptModel::decode(const int32_t* tokens) {
  const int64_t rows = static_cast<int64_t>(positions_.size());
  for (int64_t p : positions_)
    PM_CHECK(p >= 1 && p < config_.seq_len, "decoding at position {} of a window of {}", p, config_.seq_len);
  token_rows_.resize(rows);
  for (int64_t r = 0; r < rows; ++r) token_rows_[r] = r;
  token_positions_ = positions_;
  run_forward(tokens, nullptr, rows, 1, 0.0f, -1, true);
  for (int64_t& p : positions_) ++p;
  return logits_.data();
}

double GptModel::run_forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S, float backward_scale,
                             int64_t cache_row, bool decode, const float* h_in) {
  const int64_t D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden, S_max = config_.seq_len;
  const int64_t G = config_.shared_expert_hidden, H = config_.heads, hd = D / H, T = B * S;
  const int64_t KV = config_.kv_heads_or_all(), Dkv = kv_width();
  const int L = span_.end_block;  // the blocks run are [span_.first_block, L)
  // the last passes' times, which this one's choices read (and before this one's replace them)
  agree_on_timings(true, true);
  B_ = B, T_ = T;
  backward_scale_ = backward_scale;
  if (inputs) inputs_.assign(inputs, inputs + T);
  if (targets) targets_.assign(targets, targets + T);
  const bool has_targets = targets != nullptr;
  for (auto& bp : blocks_)
    if (bp) bp->moe_pass.reset();  // the last backward is done: free the saved tensors
  h_.resize(T * D);
  if (!span_.first_stage) std::memcpy(h_.data(), h_in, T * D * sizeof(float));  // the stage before's output
  Backend& k = backend_;
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);
  std::vector<int> moe_output(L, -1), moe_ln(L, -1);  // task ids, once laid out

  // The pass as steps; each dense task reads what the step before it wrote.
  std::vector<Step> steps;
  if (span_.first_stage)  // later stages start from the stage before's output, copied into h_ above
    steps.push_back(DenseStep{"embed", [this, T, D, S, V, Td, Dd, decode](TaskGraph& g, int last) {
      // vocabulary-parallel: this rank's rows of the table, the positions from the group's first
      // rank, summed over the group (each token's two terms meet once: the sum is exact); rotary
      // embeddings: no position term here (attention turns the queries and keys)
      const int64_t Vl = V / vocab_tp_, lo = vocab_tp_ > 1 ? tp_group_->rank() * Vl : 0;
      const bool positions_here = !config_.rope() && (vocab_tp_ == 1 || tp_group_->rank() == 0);
      auto lookup = [=, this] {
        for (int64_t t = 0; t < T; ++t) {
          PM_CHECK(inputs_[t] >= 0 && inputs_[t] < V, "token {} outside the vocabulary of {}", inputs_[t], V);
          const int64_t row = inputs_[t] - lo;
          const bool mine = row >= 0 && row < Vl;
          const float* e = wte_.f32() + row * D;
          const int64_t position = decode ? token_positions_[t] : t % S;
          const float* p = positions_here ? wpe_.f32() + position * D : nullptr;
          float* out = h_.data() + t * D;
          if (mine && positions_here)
            for (int64_t i = 0; i < D; ++i) out[i] = e[i] + p[i];
          else
            for (int64_t i = 0; i < D; ++i) out[i] = mine ? e[i] : positions_here ? p[i] : 0.0f;
        }
      };
      const TaskWork work{1, 0, 3 * Td * Dd * 4};
      if (vocab_tp_ == 1) return g.add({"embed", lanes::compute, "embed", -1, work, after(last), lookup});
      return add_dense_task(g, "embed", "embed", work, after(last), lookup, &h_, T * D, [] {});
    }});
  for (int l = span_.first_block; l < L; ++l) {
    Block& b = *blocks_[l];
    b.x_in.resize(T * D), b.x_mid.resize(T * D);  // a ScMoE tap's address is taken when the graph is built
    // ScMoE taps at the block's input: this block's own MoE (pos1), the next one's (pos3)
    if (tap_is(l, "pos1")) steps.push_back(MoeJoin{l});
    if (l + 1 < L && tap_is(l + 1, "pos3")) steps.push_back(MoeJoin{l + 1});
    // q, k and v (k and v Dkv wide) and the projection; scores and values
    const double Dkvd = static_cast<double>(Dkv);
    const TaskWork attention_work{6, 4 * Td * Dd * (Dd + Dkvd) + 4 * Td * S * Dd, 12 * Td * Dd * 4};
    steps.push_back(DenseStep{indexed("attention", l), [&b, &k, this, l, T, D, B, S, H, KV, Dkv, hd, attention_work, decode, cache_row, S_max](TaskGraph& g, int last) {
      // tensor-parallel: this rank's heads (Dl of the D columns of q, Dkvl of k's and v's), their
      // share of the projection summed over the group (the bias added once, by its first rank)
      const int64_t Hl = H / dense_tp_, Dl = D / dense_tp_, KVl = KV / dense_tp_, Dkvl = Dkv / dense_tp_;
      auto heads = [&b, &k, this, T, D, B, S, H, Hl, Dl, KV, KVl, Dkv, Dkvl, hd, decode, cache_row, S_max] {
        b.x_in = h_;
        b.ln1_mean.resize(T), b.ln1_rstd.resize(T);
        float* ln1 = compute_into(b.ln1_out, T, D, precision_);
        norm_forward(k, config_.rmsnorm(), h_.data(), b.ln1_g, b.ln1_b, T, D, ln1, b.ln1_mean.data(), b.ln1_rstd.data());
        const int64_t ld = Dl + 2 * Dkvl;  // [q | k | v]
        b.qkv.resize(T * ld);
        keep(k, b.ln1_out, ln1, T);
        linear_forward(k, precision_, b.ln1_out.in(0), b.w_qkv, b.b_qkv, T, b.qkv.data(), frozen_pack(b.w_qkv));
        // rotary: the queries and keys turned by their positions before they meet (and before the
        // keys go into the cache)
        if (config_.rope()) rope(k, b.qkv.data(), T, decode ? token_positions_.data() : nullptr, S, false);
        float* attn = compute_into(b.attn, T, Dl, precision_);
        if (decode) {  // each token against its row's cached keys and values
          k.attention_decode(b.qkv.data(), b.k_cache.data(), b.v_cache.data(), token_positions_.data(),
                             token_rows_.data(), B, S_max, H, KV, hd, attn);
        } else {
          b.probs.resize(B * Hl * S * S);
          k.attention_forward(b.qkv.data(), B, S, Hl, KVl, hd, b.probs.data(), attn);
        }
        if (cache_row >= 0)  // a prompt: its keys and values stay for the tokens that follow
          for (int64_t t = 0; t < S; ++t)
            for (int64_t i = 0; i < Dkv; ++i) {
              b.k_cache[(cache_row * Dkv + i) * S_max + t] = b.qkv[t * ld + D + i];  // keys transposed
              b.v_cache[(cache_row * S_max + t) * Dkv + i] = b.qkv[t * ld + D + Dkv + i];
            }
        b.x_mid.resize(T * D);
        keep(k, b.attn, attn, T);
        linear_forward_share(k, b.attn.in(0), b.w_proj, b.b_proj, T, b.x_mid.data());
      };
      auto rest = [&b, &k, this, T, D] {
        for (int64_t i = 0; i < T * D; ++i) b.x_mid[i] += h_[i];
        b.ln2_out.resize(T * D), b.ln2_mean.resize(T), b.ln2_rstd.resize(T);
        norm_forward(k, config_.rmsnorm(), b.x_mid.data(), b.ln2_g, b.ln2_b, T, D, b.ln2_out.data(), b.ln2_mean.data(),
                     b.ln2_rstd.data());
      };
      return add_dense_task(g, indexed("attention", l), "attention", attention_work, after(last), heads, &b.x_mid, T * D,
                            rest);
    }});
    if (l + 1 < L && tap_is(l + 1, "pos2")) steps.push_back(MoeJoin{l + 1});
    // the task that writes this block's output into h_ must wait for a pos3 tap that reads h_
    const int pos3_reader = l + 1 < L && tap_is(l + 1, "pos3") ? l + 1 : -1;
    if (b.moe) {
      if (!config_.scmoe()) steps.push_back(MoeJoin{l});  // the experts read this block's own LN2 output
      if (G > 0) {
        const TaskWork se_work{4, 4 * Td * Dd * G, (4 * Td * G + 4 * Td * Dd) * 4};
        steps.push_back(DenseStep{indexed("shared_expert", l), [&b, &k, this, l, T, D, G, se_work](TaskGraph& g, int last) {
          return g.add({indexed("shared_expert", l), lanes::compute, "shared_expert", -1, se_work, after(last),
                        [&b, &k, this, T, D, G] { shared_expert_forward(b, k, T, D, G); }});
        }});
      }
      steps.push_back(DenseStep{indexed("residual", l), [&b, &moe_output, &moe_ln, this, l, T, D, G, pos3_reader, Td, Dd](TaskGraph& g, int last) {
        std::vector<int> deps = plus(after(last), {moe_output[l], pos3_reader >= 0 ? moe_ln[pos3_reader] : -1});
        return g.add({indexed("residual", l), lanes::compute, "residual", -1, {1, 2 * Td * Dd, 4 * Td * Dd * 4}, deps,
                      [&b, this, T, D, G] {
                        if (G > 0)
                          for (int64_t i = 0; i < T * D; ++i) h_[i] = (b.se_out[i] + b.moe_out[i]) + b.x_mid[i];
                        else
                          for (int64_t i = 0; i < T * D; ++i) h_[i] = b.moe_out[i] + b.x_mid[i];
                      }});
      }, l});
    } else {
      const double mlp_matrices = mlp_swiglu() ? 3 : 2;  // SwiGLU: W_g, W_v and W_out
      const TaskWork mlp_work{3, 2 * mlp_matrices * Td * Dd * F, ((mlp_matrices + 2) * Td * F + 4 * Td * Dd) * 4};
      steps.push_back(DenseStep{indexed("mlp", l), [&b, &k, &moe_ln, this, l, T, D, F, pos3_reader, mlp_work](TaskGraph& g, int last) {
        std::vector<int> deps = plus(after(last), {pos3_reader >= 0 ? moe_ln[pos3_reader] : -1});
        const int64_t Fl = F / dense_tp_;  // tensor-parallel: this rank's columns of the hidden layer
        auto columns = [&b, &k, this, T, Fl] {
          b.fc.resize(T * b.w_fc.dim(1));
          linear_forward(k, precision_, b.ln2_out.data(), b.w_fc, b.b_fc, T, b.fc.data(), frozen_pack(b.w_fc));
          float* act = compute_into(b.act, T, Fl, precision_);
          activation_forward(k, mlp_swiglu(), b.fc.data(), act, T, Fl);
          keep(k, b.act, act, T);
          linear_forward_share(k, b.act.in(0), b.w_out, b.b_out, T, h_.data());
        };
        auto rest = [&b, this, T, D] {
          for (int64_t i = 0; i < T * D; ++i) h_[i] += b.x_mid[i];
        };
        return add_dense_task(g, indexed("mlp", l), "mlp", mlp_work, deps, columns, &h_, T * D, rest);
      }});
    }
  }
  const TaskWork head_work{2, 2 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  if (span_.last_stage)  // earlier stages leave their output in h_ (stage_output)
    steps.push_back(DenseStep{"head", [this, T, D, V, has_targets, backward_scale, &k, head_work](TaskGraph& g, int last) {
      // vocabulary-parallel: this rank's columns of the logits; the loss's max and sums reduced
      // over the group between the three parts of the cross-entropy
      const int64_t Vl = V / vocab_tp_, lo = vocab_tp_ > 1 ? tp_group_->rank() * Vl : 0;
      const float scale = backward_scale / static_cast<float>(T);
      auto logits = [this, T, D, Vl, &k] {
        h_final_ = h_;
        lnf_out_.resize(T * D), lnf_mean_.resize(T), lnf_rstd_.resize(T);
        norm_forward(k, config_.rmsnorm(), h_.data(), lnf_g_, lnf_b_, T, D, lnf_out_.data(), lnf_mean_.data(),
                     lnf_rstd_.data());
        logits_.resize(T * Vl);
        if (const PackedMatrix* head = frozen_pack(wte_))
          k.gemm_prepacked(Trans::no, T, lnf_out_.data(), D, *head, 0.0f, logits_.data(), Vl);
        else
          k.gemm_as(precision_, Trans::no, Trans::yes, T, Vl, D, lnf_out_.data(), D, wte_.f32(), D, 0.0f, logits_.data(),
                    Vl);
        loss_ = 0;
      };
      auto mean_loss = [this, T](const std::vector<float>& losses) {
        double sum = 0;
        for (float l : losses) sum += l;
        loss_ = sum / static_cast<double>(T);
      };
      if (vocab_tp_ == 1)
        return g.add({"head", lanes::compute, "head", -1, head_work, after(last),
                      [this, T, V, has_targets, backward_scale, scale, &k, logits, mean_loss] {
                        logits();
                        if (!has_targets) return;
                        std::vector<float> losses(T);
                        if (backward_scale > 0) dlogits_.resize(T * V);
                        k.cross_entropy(logits_.data(), targets_.data(), T, V, losses.data(),
                                        backward_scale > 0 ? dlogits_.data() : nullptr, scale);
                        mean_loss(losses);
                      }});
      const int shard = g.add({"head", lanes::compute, "head", -1, head_work, after(last), [this, T, Vl, has_targets, &k, logits] {
                                 logits();
                                 if (has_targets) ce_max_.resize(T), k.shard_row_max(logits_.data(), T, Vl, ce_max_.data());
                               }});
      if (!has_targets) return shard;
      const int max = g.add({"head max all-reduce", lanes::comm, "tp_allreduce", -1, {1, 0, 8.0 * T}, {shard}, [this, T] {
                               tp_group_->allreduce(ce_max_.data(), ce_max_.data(), T, DType::f32, ReduceOp::max);
                             }});
      const int sums = g.add({"head sums", lanes::compute, "head", -1, {1, 0, 4.0 * T * Vl}, {max}, [this, T, Vl, lo, &k] {
                                ce_sums_.resize(2 * T);
                                k.shard_exp_sums(logits_.data(), targets_.data(), T, Vl, lo, ce_max_.data(), ce_sums_.data());
                              }});
      const int summed = g.add({"head sums all-reduce", lanes::comm, "tp_allreduce", -1, {1, 0, 32.0 * T}, {sums}, [this, T] {
                                  tp_group_->allreduce(ce_sums_.data(), ce_sums_.data(), 2 * T, DType::f64, ReduceOp::sum);
                                }});
      return g.add({"head loss", lanes::compute, "head", -1, {1, 0, 8.0 * T * Vl}, {summed},
                    [this, T, Vl, lo, backward_scale, scale, &k, mean_loss] {
                      std::vector<float> losses(T);
                      if (backward_scale > 0) dlogits_.resize(T * Vl);
                      k.shard_cross_entropy(logits_.data(), targets_.data(), T, Vl, lo, ce_max_.data(), ce_sums_.data(),
                                            losses.data(), backward_scale > 0 ? dlogits_.data() : nullptr, scale);
                      mean_loss(losses);
                    }});
    }});

  TaskGraph g;
  std::map<int, PassTasks> moe_tasks;
  lay_out(g, steps, [&](int block, int& last, const std::vector<std::string>& candidates, auto between) {
    Block* bp = blocks_[block].get();
    Block& b = *bp;
    b.moe_out.resize(T * D);
    std::vector<int> front = after(last);
    const float* moe_input = b.ln2_out.data();
    if (config_.scmoe()) {
      // the routed experts' own LayerNorm of the tapped representation, read where it is now
      const float* tap = scmoe_tap_now(block);
      b.moe_in.resize(T * D), b.moe_mean.resize(T), b.moe_rstd.resize(T);
      moe_ln[block] = g.add({indexed("moe_ln", block), lanes::compute, "layernorm", -1, {1, 8 * Td * Dd, 3 * Td * Dd * 4},
                             front, [bp, &k, tap, T, D, this] {
                               norm_forward(k, config_.rmsnorm(), tap, bp->ln_moe_g, bp->ln_moe_b, T, D,
                                            bp->moe_in.data(), bp->moe_mean.data(), bp->moe_rstd.data());
                             }});
      front = {moe_ln[block]};
      moe_input = b.moe_in.data();
    } else {
      b.ln2_out.resize(T * D);  // the layer's input: its address must be known when its tasks are added
      moe_input = b.ln2_out.data();
    }
    const int slot = choose_slot(block, /*forward=*/true, candidates);
    MoeForward f = b.moe->append_forward(g, front, moe_input, T, b.moe_out.data(),
                                         [&](TaskGraph& graph) { between(graph, slot); });
    b.moe_pass = f.pass;
    moe_output[block] = f.tasks.output;
    moe_tasks[block] = f.tasks;
    slots_fwd_[block] = slot;
  });
  forward_exposed_ms_ = run(g, "forward");
  remember(g, moe_tasks, last_forward_);
  backward_exposed_ms_ = 0;
  hidden_by_block_ = last_forward_.moe_hidden;
  return loss_;
}

}  // namespace pm
