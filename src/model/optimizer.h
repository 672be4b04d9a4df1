// AdamW with decoupled weight decay, a linear warm-up then cosine decay of the learning rate, and
// global-norm clipping over every parameter of every rank (expert gradients counted once, on the
// rank that owns them). The data-parallel all-reduce before it is model/grad_sync.h.
#pragma once

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/parameter.h"
#include "model/train_config.h"

namespace pm {

// Learning rate at step (0-based): warm-up from lr/warmup to lr, then cosine down to min_lr.
double learning_rate(const TrainConfig& c, int64_t step);

// The norm of the whole model's gradient; collective.
// expert_copies: how many ranks hold each expert (ppmoe: the tensor-parallel groups; ep: 1).
// Pipeline stages: `pipeline` (this rank's pipeline group) adds up the stages' replicated
// gradients, the one named not_counted left out (the tied embedding on the last stage, whose
// gradient is the first stage's too).
double global_grad_norm(const std::vector<Parameter>& params, Communicator& comm, int expert_copies = 1,
                        Communicator* pipeline = nullptr, const std::string& not_counted = "");
// The factor that takes a gradient of norm `norm` to at most max_norm (0: no clipping): 1 where it
// is within it (or not a number).
float clip_scale(double norm, double max_norm);
// Scales every gradient so that the global norm is at most max_norm (0: no clipping); returns the
// norm before clipping. Collective. (A trainer can instead pass clip_scale to AdamW::step, which
// scales each gradient as it reads it: one pass over the gradients less, the same bits.)
double clip_by_global_norm(std::vector<Parameter>& params, Communicator& comm, double max_norm, int expert_copies = 1,
                           Communicator* pipeline = nullptr, const std::string& not_counted = "");

class AdamW {
 public:
  explicit AdamW(std::vector<Parameter>& params);
  // One update with the current gradients (already all-reduced and clipped), each read times
  // grad_scale (clip_scale's factor: the gradients clip_by_global_norm would leave, the same floats).
  void step(const TrainConfig& c, double lr, float grad_scale = 1.0f);
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t steps) { steps_ = steps; }
  std::vector<Tensor>& first_moments() { return m_; }
  std::vector<Tensor>& second_moments() { return v_; }

 private:
  std::vector<Parameter>& params_;
  std::vector<Tensor> m_, v_;
  int64_t steps_ = 0;
};

}  // namespace pm
