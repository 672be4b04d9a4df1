#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <map>

#include "model/gpt_internal.h"

namespace pm {

using namespace gpt_internal;  // the parts the model's source files share

void GptModel::backward() {
  PM_CHECK(span_.first_stage && span_.last_stage, "a pipeline stage runs backward_stage");
  backward_stage(nullptr);
}

void GptModel::backward_stage(const float* dh_in) {
  PM_CHECK(backward_scale_ > 0 && (!span_.last_stage || !targets_.empty()),
           "backward needs a forward with targets and a backward scale");
  PM_CHECK(span_.last_stage || dh_in, "a stage's backward needs the gradient of its output");
  agree_on_timings(false, true);  // the last backward's times (not the forward's just run: no wait here)
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t G = config_.shared_expert_hidden, H = config_.heads, hd = D / H, T = T_, B = B_;
  const int64_t KVl = config_.kv_heads_or_all() / dense_tp_, Dkvl = kv_width() / dense_tp_;
  const int L = span_.end_block, L0 = span_.first_block;  // this stage's blocks: [L0, L)
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);
  Backend& k = backend_;
  const bool scmoe = config_.scmoe();
  // the backward's own buffers: alive until its graph has run. Those its steps overwrite whole
  // before reading are left uninitialised (zero-filling them cost a pass over 12 MB a step in the
  // DeepSeek-style model); dffn_in (an MoE layer's input gradient, summed into by the shared
  // expert) and the buffers a tensor-parallel step sums over its group stay zero-filled.
  Buffer<float> dln(T * D), dtmp(T * D), dffn_in(T * D);
  ScratchBuffer<float> dh(T * D), dx_mid(T * D), dattn(T * D), dact, dfc_swiglu;
  ScratchBuffer<float> dqkv(T * (D + 2 * Dkvl));  // [dq | dk | dv]
  const RouterLossGrads router_grads{static_cast<float>(config_.aux_coef) * backward_scale_,
                                 static_cast<float>(config_.z_loss_coef) * backward_scale_};
  std::vector<int> moe_done(L, -1), moe_ln_bwd(L, -1);  // MoE output (dx) or ScMoE's LN backward; task ids
  std::vector<std::vector<int>> moe_grads(L);

  // Which MoE block's tap gradient each block's attention backward adds: into its input's gradient
  // (pos1 of this block, pos3 of the next) or its attention output's (pos2 of the next).
  auto input_tap = [&](int l) { return tap_is(l, "pos1") ? l : (l + 1 < L && tap_is(l + 1, "pos3") ? l + 1 : -1); };
  auto mid_tap = [&](int l) { return l + 1 < L && tap_is(l + 1, "pos2") ? l + 1 : -1; };

  if (!span_.last_stage) std::memcpy(dh.data(), dh_in, T * D * sizeof(float));  // from the stage after
  std::vector<Step> steps;
  // logits = lnf_out wte^T: d lnf_out = dlogits wte, d wte += dlogits^T lnf_out
  const TaskWork head_work{3, 4 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  if (span_.last_stage)  // earlier stages start from the stage after's gradient, copied into dh above
    steps.push_back(DenseStep{"head_bwd", [&, T, D, V, head_work](TaskGraph& g, int last) {
      // vocabulary-parallel: this rank's columns give its share of d lnf_out, summed over the group
      const int64_t Vl = V / vocab_tp_;
      auto shard = [&, T, D, Vl] {
        k.gemm_as(precision_, Trans::no, Trans::no, T, D, Vl, dlogits_.data(), Vl, wte_.f32(), D, 0.0f, dln.data(), D);
        k.gemm_as(precision_, Trans::yes, Trans::no, Vl, D, T, dlogits_.data(), Vl, lnf_out_.data(), D, 1.0f, dwte_.f32(), D);
      };
      auto norm = [&, T, D] {
        norm_backward(k, config_.rmsnorm(), h_final_.data(), lnf_g_, lnf_mean_.data(), lnf_rstd_.data(), dln.data(), T, D,
                      dh.data(), dlnf_g_, dlnf_b_);
      };
      if (vocab_tp_ == 1)
        return g.add({"head_bwd", lanes::compute, "head_bwd", -1, head_work, after(last), [shard, norm] { shard(), norm(); }});
      return add_dense_task(g, "head_bwd", "head_bwd", head_work, after(last), shard, &dln, T * D, norm);
    }});
  for (int l = L - 1; l >= L0; --l) {
    Block& b = *blocks_[l];
    // h' = x_mid + FFN(LN2(x_mid)): the residual carries dh to x_mid, the FFN adds its share
    if (b.moe) {
      if (scmoe) {
        // the MoE's output gradient is dh here; the blocks below overwrite dh while its backward runs
        steps.push_back(DenseStep{indexed("moe_dy", l), [&b, &dh, l, Td, Dd](TaskGraph& g, int last) {
          return g.add({indexed("moe_dy", l), lanes::compute, "copy", -1, {1, 0, 2 * Td * Dd * 4}, after(last),
                        [&b, &dh] { b.moe_dy.assign(dh.begin(), dh.end()); }});
        }});
        steps.push_back(MoeJoin{l});
        if (G > 0)
          steps.push_back(DenseStep{indexed("shared_expert_bwd", l), [&, l, T, D, G](TaskGraph& g, int last) {
            return g.add({indexed("shared_expert_bwd", l), lanes::compute, "shared_expert_bwd", -1,
                          {6, 8 * Td * Dd * G, (8 * Td * G + 6 * Td * Dd) * 4}, after(last), [&, T, D, G] {
                            std::memset(dffn_in.data(), 0, T * D * sizeof(float));
                            shared_expert_backward(b, k, dh.data(), T, D, G, dffn_in.data());
                          }});
          }});
      } else {
        steps.push_back(MoeJoin{l});  // reads dh, writes dffn_in
        if (G > 0)
          steps.push_back(DenseStep{indexed("shared_expert_bwd", l), [&, l, T, D, G](TaskGraph& g, int last) {
            return g.add({indexed("shared_expert_bwd", l), lanes::compute, "shared_expert_bwd", -1,
                          {6, 8 * Td * Dd * G, (8 * Td * G + 6 * Td * Dd) * 4}, plus(after(last), {moe_done[l]}),
                          [&, T, D, G] { shared_expert_backward(b, k, dh.data(), T, D, G, dffn_in.data()); }});
          }, l});
      }
    } else {
      const double mlp_matrices = mlp_swiglu() ? 3 : 2;  // SwiGLU: W_g, W_v and W_out
      const TaskWork mlp_work{6, 4 * mlp_matrices * Td * Dd * F, (2 * (mlp_matrices + 2) * Td * F + 6 * Td * Dd) * 4};
      steps.push_back(DenseStep{indexed("mlp_bwd", l), [&, l, T, F, mlp_work](TaskGraph& g, int last) {
        const int64_t Fl = F / dense_tp_;  // tensor-parallel: this rank's hidden units; dffn_in its share
        auto columns = [&, T, Fl] {
          dact.resize(T * Fl);
          linear_backward(k, precision_, b.act.in(0), b.w_out, dh.data(), T, b.d_w_out, b.d_b_out, dact.data());
          const float* dfc = activation_backward(k, mlp_swiglu(), b.fc.data(), dact.data(), T, Fl, dfc_swiglu);
          linear_backward(k, precision_, b.ln2_out.data(), b.w_fc, dfc, T, b.d_w_fc, b.d_b_fc, dffn_in.data());
        };
        return add_dense_task(g, indexed("mlp_bwd", l), "mlp_bwd", mlp_work, after(last), columns, &dffn_in, T * D, [] {});
      }});
    }
    const int in_tap = input_tap(l), mid = mid_tap(l);
    // the step reads the MoE's input gradient: its own MoE's (not ScMoE), or a tap's
    const int needs = b.moe && !scmoe ? l : (mid >= 0 ? mid : in_tap);
    const double Dkvd = static_cast<double>(kv_width());  // the keys' and values' width
    const TaskWork attention_work{10, 8 * Td * Dd * (Dd + Dkvd) + 8 * Td * S * Dd, 20 * Td * Dd * 4};
    steps.push_back(DenseStep{indexed("attention_bwd", l), [&, l, T, D, B, S, H, hd, in_tap, mid, attention_work](TaskGraph& g, int last) {
      std::vector<int> deps = plus(after(last), {b.moe && !scmoe ? moe_done[l] : -1, in_tap >= 0 ? moe_ln_bwd[in_tap] : -1,
                                                 mid >= 0 ? moe_ln_bwd[mid] : -1});
      // tensor-parallel: this rank's heads; the gradient of LN1's output is summed over the group
      const int64_t Hl = H / dense_tp_;
      auto heads = [&, T, D, B, S, Hl, hd, mid] {
        norm_backward(k, config_.rmsnorm(), b.x_mid.data(), b.ln2_g, b.ln2_mean.data(), b.ln2_rstd.data(), dffn_in.data(),
                      T, D, dtmp.data(), b.d_ln2_g, b.d_ln2_b);
        for (int64_t i = 0; i < T * D; ++i) dx_mid[i] = dh[i] + dtmp[i];
        if (mid >= 0)  // ScMoE pos2: the next block's experts read this attention output
          for (int64_t i = 0; i < T * D; ++i) dx_mid[i] += blocks_[mid]->dtap[i];
        // x_mid = x_in + Attn(LN1(x_in))
        linear_backward(k, precision_, b.attn.in(0), b.w_proj, dx_mid.data(), T, b.d_w_proj, b.d_b_proj, dattn.data());
        k.attention_backward(b.qkv.data(), b.probs.data(), dattn.data(), B, S, Hl, KVl, hd, dqkv.data());
        if (config_.rope()) rope(k, dqkv.data(), T, nullptr, S, true);  // to the queries and keys before they turned
        linear_backward(k, precision_, b.ln1_out.in(0), b.w_qkv, dqkv.data(), T, b.d_w_qkv, b.d_b_qkv, dtmp.data());
      };
      auto rest = [&, T, D, in_tap] {
        norm_backward(k, config_.rmsnorm(), b.x_in.data(), b.ln1_g, b.ln1_mean.data(), b.ln1_rstd.data(), dtmp.data(), T,
                      D, dh.data(), b.d_ln1_g, b.d_ln1_b);
        for (int64_t i = 0; i < T * D; ++i) dh[i] += dx_mid[i];
        if (in_tap >= 0)  // ScMoE pos1 / pos3: experts read this block's input
          for (int64_t i = 0; i < T * D; ++i) dh[i] += blocks_[in_tap]->dtap[i];
      };
      return add_dense_task(g, indexed("attention_bwd", l), "attention_bwd", attention_work, deps, heads, &dtmp, T * D,
                            rest);
    }, needs});
  }
  if (span_.first_stage)  // later stages leave their input's gradient in dh (input_grad)
    steps.push_back(DenseStep{"embed_bwd", [&, T, D, S](TaskGraph& g, int last) {
    return g.add({"embed_bwd", lanes::compute, "embed_bwd", -1, {1, 4 * Td * Dd, 6 * Td * Dd * 4}, after(last), [&, T, D, S] {
                    // embeddings, in token order; vocabulary-parallel: this rank's rows only
                    const int64_t Vl = config_.vocab_size / vocab_tp_, lo = vocab_tp_ > 1 ? tp_group_->rank() * Vl : 0;
                    for (int64_t t = 0; t < T; ++t) {
                      const int64_t row = inputs_[t] - lo;
                      if (row >= 0 && row < Vl) k.axpy(1.0f, dh.data() + t * D, dwte_.f32() + row * D, D);
                      if (!config_.rope()) k.axpy(1.0f, dh.data() + t * D, dwpe_.f32() + (t % S) * D, D);
                    }
                  }});
  }});

  // A block's replicated gradients are final once its attention backward and its MoE's backward
  // (the gate, ScMoE's LayerNorm, its shared expert) are in: then its all-reduce joins the graph.
  // The communication lane runs its tasks in the order added, so a bucket added before the next
  // MoE's all-to-alls would hold them up, and those are on the critical path (the experts wait
  // for them) while the buckets can wait until the optimizer: a bucket joins after the next MoE
  // join that follows its block in the step list, or, past the last join, as soon as both that
  // join is in and the block's steps are. Where it joins must not depend on the slots: each rank
  // measures its own times and may lay a dense step inside a join's slot or after it, but every
  // rank must add its collectives in the same order. Both rules add the buckets in step order,
  // after the same communication tasks, whatever the slots.
  std::vector<int> flush_join(L, -1);  // step index of the join after which bucket l joins; -1: past the last
  for (int l = L0; l < L; ++l) {
    std::size_t at = 0;
    while (at < steps.size() && !(std::holds_alternative<DenseStep>(steps[at]) &&
                                  std::get<DenseStep>(steps[at]).name == indexed("attention_bwd", l)))
      ++at;
    for (std::size_t j = at + 1; j < steps.size() && flush_join[l] < 0; ++j)
      if (std::holds_alternative<MoeJoin>(steps[j])) flush_join[l] = static_cast<int>(j);
  }
  // A bucket whose all-reduce the last backward showed to fit before the next MoE join's rows
  // leave (the dense steps in between take longer than it, and than the buckets before it) goes
  // at once: it uses a link that would idle, and holds nothing up. (The times are every rank's
  // slowest, so every rank decides the same.)
  std::vector<char> at_once(L, 0);
  {
    std::map<int, double> window_left;  // per join: dense time before it not yet filled by a bucket
    for (int l = L - 1; l >= L0; --l) {
      if (flush_join[l] < 0 || last_backward_.task_s.empty()) continue;
      auto bucket = last_backward_.task_s.find(fmt::format("all-reduce block {} grads", l));
      if (bucket == last_backward_.task_s.end()) continue;
      if (!window_left.count(flush_join[l])) {
        std::size_t at = 0;
        while (std::get_if<DenseStep>(&steps[at]) == nullptr ||
               std::get<DenseStep>(steps[at]).name != indexed("attention_bwd", l))
          ++at;
        double dense = 0;
        for (std::size_t j = at + 1; j < static_cast<std::size_t>(flush_join[l]); ++j)
          if (auto* d = std::get_if<DenseStep>(&steps[j])) {
            auto t = last_backward_.task_s.find(d->name);
            if (t != last_backward_.task_s.end()) dense += t->second;
          }
        window_left[flush_join[l]] = dense;
      }
      double& left = window_left[flush_join[l]];
      if (bucket->second <= left) at_once[l] = 1, left -= bucket->second;
    }
  }
  int joins_left = 0;
  for (const Step& s : steps) joins_left += std::holds_alternative<MoeJoin>(s);
  TaskGraph g;
  std::map<int, PassTasks> moe_tasks;
  std::map<std::string, int> added;  // dense steps laid out so far, by name
  std::vector<char> announced(L, 0);
  // A block is ready once its attention backward is laid out and, for an MoE block, its MoE's
  // whole backward (the join returns only then: a step laid inside the join's slot is not enough).
  auto announce = [&](TaskGraph& graph, int l) {
    if (!grads_ready_ || announced[l] || !added.count(indexed("attention_bwd", l)) ||
        (blocks_[l]->moe && moe_done[l] < 0))
      return;
    std::vector<int> ready = moe_grads[l];
    ready.push_back(added.at(indexed("attention_bwd", l)));
    if (moe_ln_bwd[l] >= 0) ready.push_back(moe_ln_bwd[l]);
    if (auto se = added.find(indexed("shared_expert_bwd", l)); se != added.end()) ready.push_back(se->second);
    grads_ready_(graph, l, ready);
    announced[l] = 1;
  };
  for (Step& s : steps)
    if (auto* d = std::get_if<DenseStep>(&s)) {
      auto add = d->add;
      const std::string name = d->name;
      int block = -1;  // the block whose gradients this step completes
      for (int l = L0; l < L; ++l)
        if (name == indexed("attention_bwd", l)) block = l;
      d->add = [&, add, name, block](TaskGraph& graph, int last) {
        int id = add(graph, last);
        added[name] = id;
        if (block >= 0 && (at_once[block] || (flush_join[block] < 0 && joins_left == 0))) announce(graph, block);
        return id;
      };
    }
  std::vector<int> join_index(L, -1);  // the step index of each block's MoE join
  for (std::size_t j = 0; j < steps.size(); ++j)
    if (auto* m = std::get_if<MoeJoin>(&steps[j])) join_index[m->block] = static_cast<int>(j);
  lay_out(g, steps, [&](int block, int& last, const std::vector<std::string>& candidates, auto between) {
    Block* bp = blocks_[block].get();
    Block& b = *bp;
    const int slot = scmoe ? choose_slot(block, /*forward=*/false, candidates) : 0;
    PassTasks t;
    if (scmoe) {
      b.moe_dy.resize(T * D);  // the moe_dy task copies into it: its address is taken now
      b.dmoe_in.resize(T * D);
      t = b.moe->append_backward(g, after(last), *b.moe_pass, b.moe_dy.data(), b.dmoe_in.data(), router_grads,
                                 [&](TaskGraph& graph) { between(graph, slot); });
      // the routed experts' LayerNorm: its parameters' gradients, and the tap's
      b.dtap.resize(T * D);
      const float* tap = scmoe_tap_saved(block);
      moe_ln_bwd[block] = g.add({indexed("moe_ln_bwd", block), lanes::compute, "layernorm_bwd", -1,
                                 {1, 10 * Td * Dd, 4 * Td * Dd * 4}, {t.output}, [bp, &k, tap, T, D, this] {
                                   norm_backward(k, config_.rmsnorm(), tap, bp->ln_moe_g, bp->moe_mean.data(),
                                                 bp->moe_rstd.data(), bp->dmoe_in.data(), T, D, bp->dtap.data(),
                                                 bp->d_ln_moe_g, bp->d_ln_moe_b);
                                 }});
    } else {
      t = b.moe->append_backward(g, after(last), *b.moe_pass, dh.data(), dffn_in.data(), router_grads,
                                 [&](TaskGraph& graph) { between(graph, slot); });
    }
    moe_done[block] = t.output;
    moe_grads[block] = t.grads;
    moe_tasks[block] = t;
    slots_bwd_[block] = slot;
    --joins_left;
    for (int l = L - 1; l >= L0; --l)  // in step order (the backward's steps run from the last block)
      if (flush_join[l] == join_index[block] || at_once[l] || (flush_join[l] < 0 && joins_left == 0)) announce(g, l);
  });
  // the rest (embeddings, final norm) after the pass's last dense step, which follows head_bwd
  const std::string& final_step = std::get<DenseStep>(steps.back()).name;
  if (grads_ready_) grads_ready_(g, -1, {added.at(final_step)});
  backward_exposed_ms_ = run(g, "backward");
  if (!span_.first_stage) input_grad_.assign(dh.begin(), dh.end());  // for the stage before
  remember(g, moe_tasks, last_backward_);
  for (const auto& [block, o] : last_backward_.moe_hidden) hidden_by_block_[block] += o;
}

}  // namespace pm
