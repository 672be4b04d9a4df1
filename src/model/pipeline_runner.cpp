#include "model/pipeline_runner.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>

#include "core/clock.h"
#include "core/error.h"

namespace pm {

PipelineRunner::PipelineRunner(GptModel& model, Communicator* pipeline, PipelineSchedule schedule, Communicator* copies)
    : model_(model), pipeline_(pipeline), schedule_(schedule), copies_(copies && copies->size() > 1 ? copies : nullptr) {
  if (pipeline_) stage_ = pipeline_->rank(), stages_ = pipeline_->size();
  PM_CHECK(model.first_stage() == (stage_ == 0) && model.last_stage() == (stage_ == stages_ - 1),
           "stage {} of {} holds the wrong ends of the model", stage_, stages_);
}

bool PipelineRunner::sliced(int64_t count) const { return copies_ && count % copies_->size() == 0; }

void PipelineRunner::receive(float* into, int64_t count, int peer, double& wait_ms, const std::string& what) {
  Stopwatch waiting;
  TraceSpan span(trace_, what, lanes::compute.id);
  if (sliced(count)) {  // this rank's slice from its peer, the rest from the ranks beside it
    const int64_t piece = count / copies_->size();
    slice_.resize(piece);
    pipeline_->recv(slice_.data(), piece, DType::f32, peer);
    copies_->allgather(slice_.data(), into, piece, DType::f32);
  } else {
    pipeline_->recv(into, count, DType::f32, peer);
  }
  wait_ms += waiting.elapsed_ms();
}

RequestPtr PipelineRunner::send(const std::vector<float>& data, int peer) {
  const int64_t count = static_cast<int64_t>(data.size());
  if (!sliced(count)) return pipeline_->isend(data.data(), count, DType::f32, peer);
  const int64_t piece = count / copies_->size();
  return pipeline_->isend(data.data() + copies_->rank() * piece, piece, DType::f32, peer);
}

PipelineStepResult PipelineRunner::train_step(int M, int64_t B, float scale, const DrawBatch& draw, GradientSync& sync) {
  const int64_t T = B * model_.config().seq_len, D = model_.config().d_model;
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  const std::vector<PipelineOp> ops = pipeline_ops(schedule_, stage_, stages_, M);
  PipelineStepResult r;
  std::vector<int32_t> inputs(T), targets(T);
  from_before_.resize(T * D), from_after_.resize(T * D);
  // what this stage sends stays alive until the step's end: one buffer per micro-batch and direction
  std::vector<std::vector<float>> sent_forward(M), sent_backward(M);
  std::vector<RequestPtr> sends;
  std::set<int> stashed;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    const PipelineOp op = ops[i];
    const int m = op.micro_batch;
    if (op.forward) {
      draw(m, inputs.data(), targets.data());
      if (!first)
        receive(from_before_.data(), T * D, stage_ - 1, r.wait_ms, fmt::format("wait for stage {}: activations {}", stage_ - 1, m));
      r.loss += model_.forward_stage(inputs.data(), from_before_.data(), targets.data(), B, scale) / M;
      r.aux += model_.aux_loss() / M;
      r.exposed_ms += model_.forward_exposed_ms();
      if (!last) {
        sent_forward[m].assign(model_.stage_output(), model_.stage_output() + T * D);
        sends.push_back(send(sent_forward[m], stage_ + 1));
      }
      // kept for the backward, unless it comes next (one stage, or the last)
      const bool backward_next = i + 1 < ops.size() && !ops[i + 1].forward && ops[i + 1].micro_batch == m;
      if (!backward_next) {
        model_.stash_pass(m);
        stashed.insert(m);
        r.stashed_most = std::max(r.stashed_most, static_cast<int>(stashed.size()));
      }
    } else {
      if (stashed.erase(m)) model_.restore_pass(m);
      if (!last)
        receive(from_after_.data(), T * D, stage_ + 1, r.wait_ms, fmt::format("wait for stage {}: gradients {}", stage_ + 1, m));
      sync.set_enabled(i + 1 == ops.size());  // the last backward all-reduces every micro-batch's sum
      model_.backward_stage(last ? nullptr : from_after_.data());
      r.exposed_ms += model_.backward_exposed_ms();
      // The z-loss of this micro-batch's forward, made (on first use) by the routers' backward
      // tasks, which need it for its gradient: there its arithmetic fills the compute lane's wait
      // for the gradients' dispatch, where reading it after the forward put it between the two
      // passes (0.3-0.7 ms a step of configs/deepseek.json). A run that neither weights nor shows
      // it never pays for it.
      if (model_.config().z_loss_coef > 0) r.z_loss += model_.z_loss() / M;
      if (!first) {
        sent_backward[m].assign(model_.input_grad(), model_.input_grad() + T * D);
        sends.push_back(send(sent_backward[m], stage_ - 1));
      }
    }
  }
  Stopwatch waiting;
  std::optional<TraceSpan> span;
  if (pipeline_) span.emplace(trace_, "wait for the pipeline to drain", lanes::compute.id);
  for (RequestPtr& s : sends) pipeline_->waiter().wait(*s);
  // the flush: a stage done early (the last one, which ends its backwards first) idles until the
  // first is done too; counted here so that the wait is the whole bubble, as 1F1B's formula has it
  if (pipeline_) pipeline_->barrier();
  r.wait_ms += waiting.elapsed_ms();
  return r;
}

double PipelineRunner::forward_only(const int32_t* inputs, const int32_t* targets, int64_t B) {
  const int64_t T = B * model_.config().seq_len, D = model_.config().d_model;
  double unused = 0;
  from_before_.resize(T * D);
  if (stage_ > 0) receive(from_before_.data(), T * D, stage_ - 1, unused, "wait for the stage before");
  const double loss = model_.forward_stage(inputs, from_before_.data(), targets, B, 0.0f);
  // a chain, forward only: the next stage is (or will be) waiting for this, never the other way
  if (stage_ + 1 < stages_) {
    std::vector<float> out(model_.stage_output(), model_.stage_output() + T * D);
    RequestPtr sent = send(out, stage_ + 1);
    pipeline_->waiter().wait(*sent);
  }
  return loss;
}

}  // namespace pm
