#include "model/trainer.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>

#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "core/stats.h"
#include "model/checkpoint.h"
#include "model/corpus.h"
#include "model/dataset.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/optimizer.h"
#include "perf/degree_choice.h"
#include "sched/executor.h"
#include "sched/trace.h"

namespace pm {
namespace {
namespace fs = std::filesystem;

// The keys that shape the model: a checkpoint resumes only under the same values.
const char* const kModelKeys[] = {"seq_len", "d_model",       "layers",    "heads", "mlp_hidden", "moe_every",
                                  "experts", "top_k",         "capacity_factor", "expert_hidden", "tokenizer_vocab"};

// Mean cross-entropy over the fixed validation batches, averaged over ranks.
double evaluate(GptModel& model, const TokenData& data, const TrainConfig& c, Communicator& comm) {
  const int64_t B = c.batch_size, S = c.model.seq_len;
  std::vector<int32_t> in(B * S), tg(B * S);
  double sum = 0;
  for (int i = 0; i < c.eval_batches; ++i) {
    sample_batch(data.validation, B, S, c.seed, stream_id(31, i, comm.rank()), in.data(), tg.data());
    sum += model.forward(in.data(), tg.data(), B, 0.0f);
  }
  return comm.allreduce_scalar(sum / c.eval_batches, ReduceOp::sum) / comm.size();
}

// The MoE layers' pipeline degrees: fixed, planned from a profile, or timed on the first MoE
// layer with random input of the training shape (results do not depend on the degree).
DegreeChoice choose_moe_degrees(GptModel& model, const TrainConfig& c, Communicator& comm, Executor& executor,
                                Backend& backend) {
  std::vector<MoeLayer*> layers = model.moe_layers();
  DegreeChoice choice;
  if (layers.empty()) return choice;
  const int request = parse_degree(c.degree, "degree");
  const int64_t T = static_cast<int64_t>(c.batch_size) * c.model.seq_len, D = c.model.d_model;
  const MoeShape shape = layers[0]->shape().with_tokens(T);
  if (request > 0) shape.check_degree(request, "configuration: degree");
  std::optional<PerfProfile> profile;
  if (!c.profile.empty()) profile = load_profile_for(comm, c.profile, describe_cluster(comm, backend));
  MoeLayer& probe = *layers[0];
  std::vector<float> x(T * D), y(T * D), dy(T * D), dx(T * D);
  Rng(c.seed, stream_id(40, comm.rank())).fill_normal(x.data(), x.size(), 0.0f, 1.0f);
  Rng(c.seed, stream_id(41, comm.rank())).fill_normal(dy.data(), dy.size(), 0.0f, 1.0f);
  auto pass = [&] {
    comm.barrier();
    LayerPassRun f, b;
    std::shared_ptr<MoePass> p = forward_alone(probe, executor, x.data(), T, y.data(), nullptr, &f);
    backward_alone(probe, executor, *p, dy.data(), dx.data(), 0.0f, nullptr, &b);
    return std::make_pair(f.stats.wall_ms, b.stats.wall_ms);
  };
  auto measure = [&](int f, int b) {
    probe.set_degrees(f, b);
    auto [fwd_ms, bwd_ms] = pass();
    double v[2] = {fwd_ms, bwd_ms};
    comm.allreduce(v, v, 2, DType::f64, ReduceOp::max);
    return std::make_pair(v[0], v[1]);
  };
  if (request == 0) pass();  // warms buffers before anything is timed
  choice = choose_degrees(request, request, profile ? &*profile : nullptr, shape, profile ? 3 : 0, measure);
  model.zero_grads();  // the probe's passes left gradients behind
  for (MoeLayer* l : layers) l->set_degrees(choice.forward, choice.backward);
  return choice;
}

std::string default_log_path(const TrainConfig& c) {
  if (!c.log_csv.empty()) return c.log_csv;
  if (!c.save.empty()) return (fs::path(c.save) / "log.csv").string();
  return "out/train_log.csv";
}

// Draws the loss curve with scripts/plot-loss (matplotlib) if it and python3 are there.
void plot_loss_curve(const std::string& csv, const std::string& png) {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  fs::path script = exe.parent_path().parent_path() / "scripts" / "plot-loss";
  if (ec || !fs::exists(script)) {
    log::info("loss curve: {} not found, no PNG drawn", script.string());
    return;
  }
  std::string cmd = "/usr/bin/python3 '" + script.string() + "' '" + csv + "' '" + png + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) == 0)
    log::info("loss curve: {}", png);
  else
    log::info("loss curve: could not draw {} (needs python3-matplotlib: scripts/setup demo)", png);
}

}  // namespace

nlohmann::json train(Communicator& comm, TrainConfig c) {
  const int P = comm.size(), rank = comm.rank();
  c.validate(P);
  std::optional<CheckpointState> resumed;
  if (!c.resume.empty()) {
    resumed = read_checkpoint_state(comm, c.resume);
    PM_REQUIRE(resumed->world_size == P,
               "checkpoint {} was written by {} ranks, this run has {}: resume with the same number of ranks",
               c.resume, resumed->world_size, P);
    for (const char* key : kModelKeys)
      PM_REQUIRE(resumed->config.value(key, nlohmann::json()) == c.to_json()[key],
                 "checkpoint {} is of another model: its {} is {}, this configuration says {}", c.resume, key,
                 resumed->config.value(key, nlohmann::json()).dump(), c.to_json()[key].dump());
  }
  Stopwatch setup;
  TokenData data = load_token_data(comm, c, resumed ? &resumed->tokenizer_json : nullptr);
  c.model.vocab_size = data.tokenizer.vocab_size();
  const double unigram = unigram_entropy(data.validation, c.model.vocab_size);
  const double val_bytes_per_token = static_cast<double>(data.validation_bytes) / data.validation.size();

  Executor executor;
  Backend& backend = cpu_backend();
  GptModel model(c.model, comm, executor, backend);
  GradientSync grad_sync(model.parameters(), c.model.layers, comm, c.overlap_grad_allreduce);
  model.set_grads_ready([&](TaskGraph& g, int block, const std::vector<int>& ready) { grad_sync.grads_ready(g, block, ready); });
  model.init_parameters(c.seed);
  AdamW optimizer(model.parameters());
  int64_t start = 0;
  if (resumed) {
    load_checkpoint_tensors(comm, c.resume, model.parameters(), &optimizer);
    start = resumed->step;
  }
  DegreeChoice degrees = choose_moe_degrees(model, c, comm, executor, backend);

  int64_t n_params = 0;
  for (const Parameter& p : model.parameters()) n_params += p.value->numel() * (p.expert ? P : 1);
  const int64_t B = c.batch_size, S = c.model.seq_len, tokens_per_step = B * S * P;
  log::info("data: {}: {} training and {} validation tokens, BPE vocabulary {}, unigram entropy of validation {:.3f} nats/token",
            data.description, data.train.size(), data.validation.size(), c.model.vocab_size, unigram);
  log::info("model: {} parameters, {} layers ({} MoE: {} experts, top-{}), d_model {}, {} ranks, {} tokens per step",
            n_params, c.model.layers, c.model.moe_layers(), c.model.experts, c.model.top_k, c.model.d_model, P,
            tokens_per_step);
  if (c.model.moe_layers() > 0)
    log::info("MoE pipeline degree: forward {}, backward {}{}{}", degrees.forward, degrees.backward,
              degrees.plan ? fmt::format(" (planned {}/{})", degrees.planned_forward, degrees.planned_backward) : "",
              degrees.measured ? " (timed)" : "");
  if (resumed) log::info("resuming from {} at step {}", c.resume, start);
  log::info("setup took {:.1f} s", setup.elapsed_s());

  // The checkpoint folder and the log must be writable before the first step: agreed by all ranks.
  const std::string csv_path = default_log_path(c);
  std::ofstream csv;
  std::string open_error;
  if (rank == 0) {
    std::error_code ec;
    if (!c.save.empty()) fs::create_directories(c.save, ec);
    if (ec) open_error = fmt::format("cannot create checkpoint folder {}: {}", c.save, ec.message());
    if (open_error.empty() && fs::path(csv_path).has_parent_path()) fs::create_directories(fs::path(csv_path).parent_path(), ec);
    bool append = resumed && fs::exists(csv_path);
    if (open_error.empty()) csv.open(csv_path, append ? std::ios::app : std::ios::trunc);
    if (open_error.empty() && !csv.good()) open_error = fmt::format("cannot write the training log {}", csv_path);
    if (open_error.empty() && !append) csv << "step,lr,train_loss,aux_loss,val_loss,tokens_per_s,step_ms,compute_ms,exposed_comm_ms\n";
  }
  open_error = comm.broadcast_string(open_error, 0);
  PM_REQUIRE(open_error.empty(), "{}", open_error);

  std::vector<int32_t> in(B * S), tg(B * S);
  std::vector<double> window_loss, step_ms_all, exposed_all;
  double last_train = NAN, last_val = NAN;
  Trace trace;
  double trace_origin = 0;
  const int64_t last = c.stop_at > 0 ? c.stop_at : c.max_steps;  // the last step this run takes
  for (int64_t step = start; step < last; ++step) {
    const bool log_now = (step + 1) % c.log_every == 0 || step + 1 == last;
    const bool traced = !c.trace.empty() && step + 1 == last;
    if (traced) {
      comm.barrier();
      trace_origin = now_s();
      model.set_trace(&trace);
    }
    Stopwatch step_watch;
    sample_batch(data.train, B, S, c.seed, stream_id(30, step, rank), in.data(), tg.data());
    model.zero_grads();
    double loss = model.forward(in.data(), tg.data(), B, 1.0f / P);
    model.backward();  // with the gradient all-reduce
    std::optional<TraceSpan> span(std::in_place, traced ? &trace : nullptr, "optimizer", 0);
    clip_by_global_norm(model.parameters(), comm, c.grad_clip);
    const double lr = learning_rate(c, step);
    optimizer.step(c, lr);
    span.reset();
    double step_ms = step_watch.elapsed_ms();
    // what the compute lane waited for: all-to-alls and gradient all-reduces not hidden
    double exposed_ms = model.exposed_comm_ms();
    double stats[4] = {loss, model.aux_loss(), step_ms, exposed_ms};
    comm.allreduce(stats, stats, 4, DType::f64, ReduceOp::sum);
    loss = stats[0] / P;
    const double aux = stats[1] / P, mean_step_ms = stats[2] / P, mean_exposed = stats[3] / P;
    window_loss.push_back(loss);
    if (step - start >= 2) step_ms_all.push_back(mean_step_ms), exposed_all.push_back(mean_exposed);
    if (traced) {
      model.set_trace(nullptr);
      trace.write_chrome_json(c.trace, trace_origin, comm.rank(), [&](const std::string& mine) { return comm.gather_strings(mine, 0); });
      log::info("trace of step {}: {}", step + 1, c.trace);
    }
    const double tok_s = tokens_per_step / (mean_step_ms / 1e3);
    std::optional<double> val;
    if ((step + 1) % c.eval_every == 0 || step + 1 == last) val = last_val = evaluate(model, data, c, comm);
    if (log_now) {
      double mean = 0;
      for (double l : window_loss) mean += l;
      last_train = mean / window_loss.size();
      window_loss.clear();
      log::info("step {:5d}/{} | loss {:.4f} | aux {:.4f} | lr {:.2e} | {:7.0f} tok/s | {:6.1f} ms/step: compute {:.1f} + "
                "exposed comm {:.1f} | degree {}/{}",
                step + 1, c.max_steps, last_train, aux, lr, tok_s, mean_step_ms, mean_step_ms - mean_exposed,
                mean_exposed, degrees.forward, degrees.backward);
    }
    if (val)
      log::info("step {:5d} | validation loss {:.4f} nats/token (perplexity {:.1f}, {:.3f} bits/byte) | unigram entropy "
                "{:.4f} nats/token",
                step + 1, *val, std::exp(*val), *val / std::log(2.0) / val_bytes_per_token, unigram);
    if (rank == 0) {
      // losses at full precision (the shortest text that reads back as the same double): a resumed
      // run can be compared with an uninterrupted one bit for bit
      csv << step + 1 << "," << lr << "," << fmt::format("{}", loss) << "," << fmt::format("{}", aux) << ","
          << (val ? fmt::format("{}", *val) : "") << ","
          << tok_s << "," << mean_step_ms << "," << mean_step_ms - mean_exposed << "," << mean_exposed << "\n";
      csv.flush();
    }
    const bool save_now = !c.save.empty() && ((c.save_every > 0 && (step + 1) % c.save_every == 0) || step + 1 == last);
    if (save_now) {
      CheckpointState s{step + 1, c.to_json(), P, data.tokenizer.to_json(), {{"data", data.description}}};
      std::string where = save_checkpoint(comm, c.save, model.parameters(), &optimizer, s);
      log::info("checkpoint: {}", where);
    }
  }
  if (rank == 0) {
    csv.close();
    std::string png = !c.plot.empty() ? c.plot : fs::path(csv_path).replace_extension(".png").string();
    plot_loss_curve(csv_path, png);
  }
  double ms = step_ms_all.empty() ? NAN : summarize(step_ms_all).median;
  double exposed = exposed_all.empty() ? NAN : summarize(exposed_all).median;
  return {{"train_loss", last_train},
          {"val_loss", last_val},
          {"unigram_entropy", unigram},
          {"unit", "nats per token"},
          {"val_bits_per_byte", last_val / std::log(2.0) / val_bytes_per_token},
          {"unigram_bits_per_byte", unigram / std::log(2.0) / val_bytes_per_token},
          {"tokens_per_s", tokens_per_step / (ms / 1e3)},
          {"steps", last},
          {"ms_per_step", ms},
          {"exposed_comm_ms_per_step", exposed},
          {"exposed_comm_share", exposed / ms},
          {"degree_fwd", degrees.forward},
          {"degree_bwd", degrees.backward},
          {"world_size", P},
          {"parameters", n_params},
          {"log_csv", csv_path}};
}

}  // namespace pm
