#include "model/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "core/aligned.h"
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
#include "model/numerics_guard.h"
#include "core/memory_use.h"
#include "model/optimizer.h"
#include "model/parallel_layout.h"
#include "model/pipeline_runner.h"
#include "model/stage_split.h"
#include "model/task_times.h"
#include "model/train_log.h"
#include "model/layer_degrees.h"
#include "perf/degree_choice.h"
#include "sched/executor.h"
#include "sched/overlap.h"
#include "sched/trace.h"

namespace pm {
namespace {
namespace fs = std::filesystem;

// The keys that shape the model: a checkpoint resumes only under the same values.
const char* const kModelKeys[] = {"seq_len",         "d_model",       "layers",    "heads",     "mlp_hidden",
                                  "moe_every",       "first_dense_blocks", "experts",       "top_k",     "capacity_factor",
                                  "expert_hidden",   "tokenizer_vocab", "arch",    "scmoe_tap",
                                  "shared_expert_hidden", "coef_gate", "norm",     "position",
                                  "rope_theta",      "mlp_activation", "expert_activation",
                                  "shared_expert_activation", "router_score", "kv_heads"};

// Mean cross-entropy over the fixed validation batches, averaged over the last stage's ranks.
double evaluate(PipelineRunner& runner, const TokenData& data, const TrainConfig& c, Communicator& comm,
                const ParallelLayout& layout) {
  const int64_t B = c.batch_size, S = c.model.seq_len;
  std::vector<int32_t> in(B * S), tg(B * S);
  double sum = 0;
  for (int i = 0; i < c.eval_batches; ++i) {
    sample_batch(data.validation, B, S, c.seed, stream_id(31, i, layout.dp_rank(comm.rank())), in.data(), tg.data());
    sum += runner.forward_only(in.data(), tg.data(), B);
  }
  return comm.allreduce_scalar(sum / c.eval_batches, ReduceOp::sum) / layout.stage_size();
}

// Every stage's values, concatenated in stage order, on every rank of the pipeline (with one
// stage: the values).
std::vector<double> concat_over_stages(Communicator* pipeline, const std::vector<double>& mine) {
  if (!pipeline || pipeline->size() == 1) return mine;
  std::vector<std::string> parts = pipeline->gather_strings(nlohmann::json(mine).dump(), 0);
  nlohmann::json all = nlohmann::json::array();
  for (const std::string& p : parts)
    for (double v : nlohmann::json::parse(p)) all.push_back(v);
  return nlohmann::json::parse(pipeline->broadcast_string(all.dump(), 0)).get<std::vector<double>>();
}

// The degree tuning's summary over every pipeline stage's layers (each stage tunes its own, on
// the same steps): tunings, layers changed and costs added up, steps the most of any stage.
nlohmann::json tuning_over_stages(Communicator* pipeline, const LayerDegrees& degrees) {
  nlohmann::json mine = degrees.summary();
  const std::vector<double> all = concat_over_stages(
      pipeline, {mine["on"].get<bool>() ? 1.0 : 0.0, mine["tunings"].get<double>(), mine["steps"].get<double>(),
                 mine["layers_changed_by_timing"].get<double>(), mine["predicted_cost_ms"].get<double>(),
                 mine["measured_cost_ms"].get<double>()});
  double on = 0, tunings = 0, steps = 0, changed = 0, predicted = 0, measured = 0;
  for (std::size_t at = 0; at + 6 <= all.size(); at += 6) {
    on = std::max(on, all[at]), tunings += all[at + 1], steps = std::max(steps, all[at + 2]);
    changed += all[at + 3], predicted += all[at + 4], measured += all[at + 5];
  }
  mine.update({{"on", on > 0}, {"tunings", static_cast<int>(tunings)}, {"steps", static_cast<int>(steps)},
               {"layers_changed_by_timing", static_cast<int>(changed)}, {"predicted_cost_ms", predicted},
               {"measured_cost_ms", measured}});
  return mine;
}

// Every stage's line, joined in stage order ("; "), the empty ones left out.
std::string join_over_stages(Communicator* pipeline, const std::string& mine) {
  if (!pipeline || pipeline->size() == 1) return mine;
  std::string all;
  for (const std::string& p : pipeline->gather_strings(mine, 0))
    if (!p.empty()) all += (all.empty() ? "" : "; ") + p;
  return pipeline->broadcast_string(all, 0);
}

// The MoE layers' pipeline degrees: fixed, planned from a profile, or timed on the first MoE
// layer with random input of the training shape (results do not depend on the degree).
DegreeChoice choose_moe_degrees(GptModel& model, const TrainConfig& c, Communicator& comm, Executor& executor,
                                const PerfProfile* profile) {
  std::vector<MoeLayer*> layers = model.moe_layers();
  DegreeChoice choice;
  if (layers.empty()) return choice;
  const int request = parse_degree(c.degree, "degree");
  const int64_t T = static_cast<int64_t>(c.batch_size) * c.model.seq_len, D = c.model.d_model;
  const MoeShape shape = layers[0]->shape().with_tokens(T);
  if (request > 0) shape.check_degree(request, "configuration: degree");
  MoeLayer& probe = *layers[0];
  // the model's own kind of memory (huge pages for large blocks), as its activations
  FloatBuffer x(T * D), y(T * D), dy(T * D), dx(T * D);
  const int data_rank = comm.rank() / c.model.ranks_per_batch();  // a ppmoe group's ranks: the same tokens
  // (comm is the stage's group: its rank / tp is the data-parallel place)
  Rng(c.seed, stream_id(40, data_rank)).fill_normal(x.data(), x.size(), 0.0f, 1.0f);
  Rng(c.seed, stream_id(41, data_rank)).fill_normal(dy.data(), dy.size(), 0.0f, 1.0f);
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
  choice = choose_degrees(request, request, profile, shape, profile ? 3 : 0, measure, 5, probe.strategy());
  model.zero_grads();  // the probe's passes left gradients behind
  for (MoeLayer* l : layers) l->set_degrees(choice.forward, choice.backward);
  return choice;
}

// Each MoE block's pipeline degrees (and ScMoE slots) of the last passes, for the progress line:
// "degree 2/1" or "degree 2/1 slot 4/3" when every block has the same, else block by block.
std::string moe_schedule(GptModel& model, bool scmoe) {
  std::vector<std::string> each;
  int i = 0;
  for (MoeLayer* layer : model.moe_layers()) {
    std::string s = fmt::format("degree {}/{}", layer->forward_degree(), layer->backward_degree());
    if (scmoe) {
      auto slot = [&](const std::map<int, int>& slots) {
        if (slots.empty()) return std::string("-");
        auto it = std::next(slots.begin(), std::min<std::ptrdiff_t>(i, static_cast<std::ptrdiff_t>(slots.size()) - 1));
        return std::to_string(it->second);
      };
      s += fmt::format(" slot {}/{}", slot(model.forward_slots()), slot(model.backward_slots()));
    }
    each.push_back(s);
    ++i;
  }
  if (each.empty() || std::all_of(each.begin(), each.end(), [&](const std::string& s) { return s == each[0]; }))
    return each.empty() ? "" : each[0];
  std::string out;
  for (std::size_t k = 0; k < each.size(); ++k) out += fmt::format("{}MoE {}: {}", k ? "; " : "", k, each[k]);
  return out;
}

// The ScMoE windows the planner chose, block by block, for the final JSON.
nlohmann::json window_json(const GptModel& model) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [block, f] : model.forward_windows()) {
    nlohmann::json w = {{"block", block}, {"degree_fwd", f.degree}, {"slot_fwd", f.slot},
                        {"predicted_fwd_ms", f.predicted_s * 1e3}, {"comm_scale_fwd", f.comm_scale}};
    auto b = model.backward_windows().find(block);
    if (b != model.backward_windows().end())
      w.update({{"degree_bwd", b->second.degree}, {"slot_bwd", b->second.slot},
                {"predicted_bwd_ms", b->second.predicted_s * 1e3}, {"comm_scale_bwd", b->second.comm_scale}});
    out.push_back(w);
  }
  return out;
}

// PIPEMOE_DEGREE_CYCLE="1,2,4": a test hook (tests/cli/test_soak.py) that changes every MoE
// layer's pipeline degrees every step through the list.
std::vector<int> degree_cycle_from_env() {
  std::vector<int> out;
  const char* spec = std::getenv("PIPEMOE_DEGREE_CYCLE");
  for (const char* p = spec; p && *p;) {
    char* end = nullptr;
    long d = std::strtol(p, &end, 10);
    PM_REQUIRE(end != p && d >= 1, "PIPEMOE_DEGREE_CYCLE must be a list of degrees like 1,2,4, got '{}'", spec);
    out.push_back(static_cast<int>(d));
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}


std::string default_log_path(const TrainConfig& c) {
  if (!c.log_csv.empty()) return c.log_csv;
  if (!c.save.empty()) return (fs::path(c.save) / "log.csv").string();
  return "out/train_log.csv";
}

// Tokens routed to each expert (every choice, kept or dropped), summed over ranks, per MoE layer:
// the busiest expert and the mean; and the share of choices dropped by capacity.
void moe_load(const GptModel& model, Communicator& comm, Communicator* pipeline, int experts, StepRecord& r) {
  std::vector<const MoePass*> passes = model.moe_passes();
  std::vector<double> counts(passes.size() * experts + 2, 0.0);  // [layer][expert], dropped, choices
  for (std::size_t l = 0; l < passes.size(); ++l) {
    const Routing& routing = passes[l]->routing();
    for (std::size_t i = 0; i < routing.expert.size(); ++i) {
      counts[l * experts + routing.expert[i]] += 1;
      counts[counts.size() - 2] += routing.slot[i] < 0;
    }
    counts.back() += static_cast<double>(routing.expert.size());
  }
  comm.allreduce(counts.data(), counts.data(), static_cast<int64_t>(counts.size()), DType::f64, ReduceOp::sum);
  for (std::size_t l = 0; l < passes.size(); ++l) {
    double most = 0, sum = 0;
    for (int e = 0; e < experts; ++e) most = std::max(most, counts[l * experts + e]), sum += counts[l * experts + e];
    r.load_max.push_back(most);
    r.load_mean.push_back(sum / experts);
  }
  r.load_max = concat_over_stages(pipeline, r.load_max), r.load_mean = concat_over_stages(pipeline, r.load_mean);
  const std::vector<double> dropped = concat_over_stages(pipeline, {counts[counts.size() - 2], counts.back()});
  double dropped_sum = 0, choices = 0;
  for (std::size_t i = 0; i < dropped.size(); i += 2) dropped_sum += dropped[i], choices += dropped[i + 1];
  r.dropped_share = choices > 0 ? dropped_sum / choices : 0.0;
}

// The share of the MoE all-to-alls' time hidden behind computation, all ranks, all MoE layers and
// per layer (ScMoE's figure of merit).
void comm_hidden(const GptModel& model, Communicator& comm, Communicator* pipeline, StepRecord& r) {
  const std::map<int, Overlap>& by_block = model.comm_hidden_by_block();
  std::vector<double> v;
  for (const auto& [block, o] : by_block) v.push_back(o.total_s), v.push_back(o.hidden_s);
  if (!v.empty()) comm.allreduce(v.data(), v.data(), static_cast<int64_t>(v.size()), DType::f64, ReduceOp::sum);
  v = concat_over_stages(pipeline, v);
  if (v.empty()) return;
  double total = 0, hidden = 0;
  for (std::size_t i = 0; i < v.size(); i += 2) {
    total += v[i], hidden += v[i + 1];
    r.block_hidden_share.push_back(v[i] > 0 ? v[i + 1] / v[i] : 0.0);
  }
  r.comm_hidden_share = total > 0 ? hidden / total : 0.0;
  r.comm_hidden_total_s = total, r.comm_hidden_s = hidden;
}

// Schedules that do not fit the run: said once, at the start.
void warn_about_schedule(const TrainConfig& c, const std::optional<CheckpointState>& resumed) {
  if (c.warmup_steps >= c.max_steps)
    log::info("warning: the warm-up ({} steps) is as long as the run ({} steps): the learning rate never reaches lr {} "
              "and never decays; shorten it with --set warmup_steps=N",
              c.warmup_steps, c.max_steps, c.lr);
  if (!resumed) return;
  for (const char* key : {"max_steps", "warmup_steps", "lr", "min_lr"}) {
    nlohmann::json was = resumed->config.value(key, nlohmann::json()), now = c.to_json()[key];
    if (!was.is_null() && was != now)
      log::info("warning: the checkpoint was trained with {} {}, this run says {}: the learning-rate schedule changes "
                "shape from step {} on",
                key, was.dump(), now.dump(), resumed->step);
  }
}

// A checkpoint written by another number of ranks: its tensors are whole, so this layout takes its
// own slices of them (the experts spread over this run's ranks, AdamW's moments with them). What
// the rank count changes is which sequences make a step: step s trains on the batches drawn from
// streams (s, 0), ..., (s, dp x micro_batches - 1), batch_size sequences each, so the same
// dp x micro_batches and batch_size draw the same sequences, and the run continues as it would have,
// to float32 rounding (the gradients are summed in another order). Otherwise: said, with the
// micro_batches that would keep them. (Validation batches are drawn per data-parallel rank: the
// validation loss is over dp x eval_batches batches, another set when dp changes.)
void describe_resume_on_other_ranks(const TrainConfig& c, const ParallelLayout& layout, const CheckpointState& was) {
  const TrainConfig defaults;
  const int was_tp = was.config.value("tp", 1), was_pp = was.config.value("pp", 1);
  int was_dp = was.config.value("dp", 0);
  if (was_dp <= 0) was_dp = was.world_size / std::max(1, was_tp * was_pp);
  const int was_micro = was.config.value("micro_batches", defaults.micro_batches);
  const int64_t was_batch = was.config.value("batch_size", static_cast<int64_t>(defaults.batch_size));
  const int64_t was_batches = static_cast<int64_t>(was_dp) * was_micro, now_batches = static_cast<int64_t>(layout.dp) * c.micro_batches;
  const std::string head = fmt::format(
      "resuming a checkpoint of {} ranks (tp {} x dp {} x pp {}) on {} (tp {} x dp {} x pp {}): the same weights and "
      "optimizer state, sliced for this layout",
      was.world_size, was_tp, was_dp, was_pp, layout.world, layout.tp, layout.dp, layout.pp);
  if (was_batches == now_batches && was_batch == c.batch_size) {
    log::info("{}; each step the same {} batches of {} sequences (dp x micro_batches {} x {} then, {} x {} now): the "
              "run continues as it would have, to float32 rounding",
              head, now_batches, c.batch_size, was_dp, was_micro, layout.dp, c.micro_batches);
    return;
  }
  std::string keep;
  if (was_batch == c.batch_size && was_batches % layout.dp == 0)
    keep = fmt::format("; --set micro_batches={} keeps them", was_batches / layout.dp);
  log::info("{}", head);
  log::info("warning: each step now trains on {} batches of {} sequences (dp {} x micro_batches {}), the checkpoint's "
            "run on {} batches of {} (dp {} x micro_batches {}): other sequences from step {} on{}",
            now_batches, c.batch_size, layout.dp, c.micro_batches, was_batches, was_batch, was_dp, was_micro, was.step + 1,
            keep);
}

// The configuration as resolved (file, flags, defaults) and which rank holds what.
void print_setup(const TrainConfig& c, const ParallelLayout& layout, int hosts) {
  log::info("configuration: {}", c.to_json().dump());
  const int ranks = layout.world, tp = layout.tp;
  std::string moe_blocks;
  for (int l = 0; l < c.model.layers; ++l)
    if (c.model.is_moe(l)) moe_blocks += (moe_blocks.empty() ? "" : ", ") + std::to_string(l);
  log::info("layout: {} ranks on {} host(s) = tp {} x dp {} x pp {}{}{}", ranks, hosts, tp, layout.dp, layout.pp,
            tp > 1 ? fmt::format("; tensor-parallel groups of {} consecutive ranks share a batch and split the experts "
                                 "(the dense blocks: tp_dense {})", tp, c.model.tp_dense)
                   : "",
            layout.pp > 1 ? fmt::format("; {} pipeline stages ({} split), {} micro-batches per step, schedule {}",
                                        layout.pp, c.pipeline_split, c.micro_batches, c.pipeline_schedule)
                          : "");
  for (const std::string& line : layout.table()) log::info("layout: {}", line);
  if (moe_blocks.empty()) return;
  const int spread = c.model.expert_ranks(layout.stage_size()), per_rank = c.model.experts / spread;
  std::string holders;
  for (int r = 0; r < layout.stage_size(); ++r) {
    const int j = r % spread;  // this rank's place among the ranks its experts are spread over
    holders += fmt::format("{}rank {}: experts {}", r ? ", " : "", r,
                           per_rank == 1 ? std::to_string(j) : fmt::format("{}-{}", j * per_rank, (j + 1) * per_rank - 1));
  }
  log::info("layout: MoE blocks {} ({} experts each, strategy {}), each stage's ranks alike: {}", moe_blocks,
            c.model.experts, c.model.moe_strategy, holders);
}

}  // namespace

nlohmann::json train(Communicator& comm, TrainConfig c, Backend& backend) {
  const int P = comm.size(), rank = comm.rank();
  if (c.model.tp > 1 && c.model.moe_strategy == "ep") {
    // tensor-parallel groups hold their experts split inside them: that is PPMoE's layer (the
    // all-to-all layer would spread the experts over the whole stage)
    c.model.moe_strategy = "ppmoe";
    if (rank == 0) log::info("tp {}: moe_strategy ppmoe (the experts split inside each tensor-parallel group)", c.model.tp);
  }
  c.validate(P);
  std::optional<CheckpointState> resumed;
  if (!c.resume.empty()) {
    resumed = read_checkpoint_state(comm, c.resume);
    const nlohmann::json defaults = TrainConfig{}.to_json();  // a key older checkpoints lack had its default
    // the tensors are whole in the checkpoint: another layout takes its own slices of them
    const int was_tp = resumed->config.value("tp", 1);
    const std::string was_strategy = resumed->config.value("moe_strategy", std::string("ep"));
    if (rank == 0 && resumed->world_size == P && (was_tp != c.model.tp || was_strategy != c.model.moe_strategy))
      log::info("resuming a checkpoint of moe_strategy {} tp {} as moe_strategy {} tp {}: the same weights and "
                "optimizer state, sliced for this layout; batches and each batch's capacity follow the new layout",
                was_strategy, was_tp, c.model.moe_strategy, c.model.tp);
    for (const char* key : kModelKeys) {
      nlohmann::json was = resumed->config.value(key, defaults[key]), now = c.to_json()[key];
      if (std::string(key) == "kv_heads") {  // 0 means as many as heads
        if (was == 0) was = resumed->config.value("heads", defaults["heads"]);
        if (now == 0) now = c.model.heads;
      }
      PM_REQUIRE(was == now, "checkpoint {} is of another model: its {} is {}, this configuration says {}", c.resume, key,
                 was.dump(), now.dump());
    }
  }
  Stopwatch setup;
  TokenData data = load_token_data(comm, c, resumed ? &resumed->tokenizer_json : nullptr);
  c.model.vocab_size = data.tokenizer.vocab_size();
  const double unigram = unigram_entropy(data.validation, c.model.vocab_size);
  const double val_bytes_per_token = static_cast<double>(data.validation_bytes) / data.validation.size();

  Executor executor;
  // the stage's ranks do what all ranks do without pipeline stages: the model, its experts and
  // the data-parallel all-reduce live in the stage's group
  const ParallelLayout layout = ParallelLayout::make(P, c.model.tp, c.pp, c.model.layers,
                                                     stage_starts(c.model, c.model.vocab_size, c.pp, c.pipeline_split));
  ParallelGroups groups = ParallelGroups::make(comm, layout);
  Communicator& stage_comm = *groups.stage;
  Communicator* pipeline = layout.pp > 1 ? groups.pipeline.get() : nullptr;
  const int stage = layout.stage(rank), stage_ranks = layout.stage_size();
  GptModel model(c.model, stage_comm, executor, backend,
                 StageSpan{layout.first_block(stage), layout.end_block(stage), stage == 0, stage == layout.pp - 1});
  // a tensor-parallel group's ranks hold the same activations: each sends its slice between stages
  PipelineRunner runner(model, pipeline, parse_pipeline_schedule(c.pipeline_schedule, "configuration: 'pipeline_schedule'"),
                        c.model.ranks_per_batch() > 1 ? &model.expert_group() : nullptr);
  // ppmoe: expert gradients summed over the groups, times the ranks per group (grad_sync.h)
  GradientSync grad_sync(model.parameters(), c.model.layers, stage_comm, c.overlap_grad_allreduce, model.expert_replicas(),
                         static_cast<float>(c.model.ranks_per_batch()), c.grad_wire());
  model.set_grads_ready([&](TaskGraph& g, int block, const std::vector<int>& ready) { grad_sync.grads_ready(g, block, ready); });
  // (a resumed run takes every parameter from the checkpoint, which must hold them all)
  if (!resumed) model.init_parameters(c.seed);
  AdamW optimizer(model.parameters());
  int64_t start = 0;
  if (resumed) {
    PM_REQUIRE(resumed->step <= c.max_steps,
               "checkpoint {} is at step {}, past this run's max_steps {}: raise --max-steps to continue it", c.resume,
               resumed->step, c.max_steps);
    load_checkpoint_tensors(comm, c.resume, model.parameters(), &optimizer, c.model.expert_ranks(stage_ranks));
    start = resumed->step;
  }
  std::optional<PerfProfile> profile;
  if (!c.profile.empty()) {
    profile = load_profile_for(comm, c.profile, describe_cluster(comm, backend));
    warn_if_other_dtype(*profile, c.profile, c.model.dtype, backend.bf16_path());
  }
  DegreeChoice degrees = choose_moe_degrees(model, c, stage_comm, executor, profile ? &*profile : nullptr);
  const bool replan = profile && c.model.moe_layers() > 0 && parse_degree(c.degree, "degree") == 0 &&
                      c.degree_replan_every > 0 && !c.model.scmoe();
  std::optional<LayerDegrees> layer_degrees;  // each layer planned from its routing, then timed
  if (replan) layer_degrees.emplace(model, *profile, stage_comm, c);
  // ScMoE at degree auto with a profile: each block's slot and degree are planned together
  // before every pass (the dense tasks' times are measured by then)
  const bool plan_windows = c.model.scmoe() && profile && c.model.moe_layers() > 0 &&
                            parse_degree(c.degree, "degree") == 0 && c.model.scmoe_slot < 0 &&
                            c.scmoe_plan == "window";
  if (plan_windows) model.plan_windows_with(&*profile);

  double stage_params = 0;  // the tied embedding counted on the first stage only
  for (const Parameter& p : model.parameters())
    if (!(p.name == "wte" && !model.first_stage()))
      stage_params += static_cast<double>(p.value->numel()) * (p.expert ? c.model.expert_ranks(stage_ranks) : 1);
  int64_t n_params = 0;
  for (double v : concat_over_stages(pipeline, {stage_params})) n_params += static_cast<int64_t>(v);
  // ppmoe: the ranks of a tensor-parallel group hold the same sequences; data_rank names the group
  const int data_rank = layout.dp_rank(rank);
  const int M = c.micro_batches;
  const int64_t B = c.batch_size, S = c.model.seq_len, tokens_per_step = B * S * M * layout.dp;
  log::info("data: {}: {} training and {} validation tokens, BPE vocabulary {}, unigram entropy of validation {:.3f} nats/token",
            data.description, data.train.size(), data.validation.size(), c.model.vocab_size, unigram);
  log::info("model: {} parameters, {} layers ({} MoE: {} experts, top-{}{}), d_model {}, {} ranks, {} tokens per step",
            n_params, c.model.layers, c.model.moe_layers(), c.model.experts, c.model.top_k,
            c.model.group_limited() ? fmt::format(" within the best {} of {} groups", c.model.route_top_groups, c.model.route_groups)
                          : std::string(),
            c.model.d_model, P, tokens_per_step);
  auto activation = [](const std::string& a) { return a == "swiglu" ? "SwiGLU" : "GeLU"; };
  std::string backbone = fmt::format("backbone: {}, {} positions", c.model.rmsnorm() ? "RMSNorm" : "LayerNorm",
                                     c.model.rope() ? fmt::format("rotary (theta {:.0f})", c.model.rope_theta)
                                                    : std::string("learned"));
  if (c.model.moe_layers() < c.model.layers) backbone += fmt::format(", {} dense MLPs", activation(c.model.mlp_activation));
  if (c.model.moe_layers() > 0) backbone += fmt::format(", {} experts", activation(c.model.expert_activation));
  log::info("{}", backbone);
  if (backend.device() != Device::cpu) log::info("backend: {}", backend.name());
  if (comm.backend() == "nccl") log::info("transport: NCCL (collectives on the GPUs)");
  if (c.model.dtype == "bf16")
    log::info("dtype bf16: GEMMs on bf16 operands with fp32 accumulation ({}), all-to-all payloads in bf16 (ep); "
              "weights, gradients and optimizer state fp32{}",
              backend.bf16_path(), backend.bf16_note().empty() ? "" : " (note: " + backend.bf16_note() + ")");
  if (c.model.moe_layers() > 0)
    log::info("MoE pipeline degree: forward {}, backward {}{}{}", degrees.forward, degrees.backward,
              degrees.plan ? fmt::format(" (planned {}/{})", degrees.planned_forward, degrees.planned_backward) : "",
              degrees.measured ? " (timed)" : "");
  if (plan_windows)
    log::info("ScMoE windows: each MoE block's slot and degree planned before every pass from the profile (its "
              "all-to-alls and experts) and the last pass's dense task times (degree above: the first pass's)");
  if (resumed) log::info("resuming from {} at step {}", c.resume, start);
  if (resumed && resumed->world_size != P && rank == 0) describe_resume_on_other_ranks(c, layout, *resumed);
  print_setup(c, layout, describe_cluster(comm, backend).hosts);
  if (c.model.dense_tp() > 1)
    log::info("layout: the dense blocks split over each tensor-parallel group of {} (attention heads, MLP columns); the "
              "tied embedding and head {}",
              c.model.dense_tp(),
              model.vocab_parallel() || !model.first_stage()
                  ? "vocabulary-parallel (each rank its rows of the vocabulary, the loss reduced over the group)"
                  : "replicated (the vocabulary does not divide over the group)");
  warn_about_schedule(c, resumed);
  log::info("setup took {:.1f} s", setup.elapsed_s());

  // The checkpoint folder and the log must be writable before the first step: agreed by all ranks.
  const int64_t last = c.stop_at > 0 ? c.stop_at : c.max_steps;  // the last step this run takes
  std::string open_error;
  if (rank == 0 && !c.save.empty()) {
    std::error_code ec;
    fs::create_directories(c.save, ec);
    if (ec) open_error = fmt::format("cannot create checkpoint folder {}: {}", c.save, ec.message());
  }
  TrainLog train_log(c, rank, tokens_per_step, c.model.moe_layers(), start, last, default_log_path(c), resumed.has_value());
  if (open_error.empty()) open_error = train_log.open_error();
  open_error = comm.broadcast_string(open_error, 0);
  PM_REQUIRE(open_error.empty(), "{}", open_error);

  std::vector<double> step_ms_all, exposed_all, bubble_all;
  int held_most = 0;  // the most micro-batches a stage held between forward and backward
  Overlap hidden_total;  // the MoE all-to-alls of every step after the first two
  double last_val = NAN;
  bool windows_shown = false;
  int skipped_in_a_row = 0;  // steps whose update nan_policy "skip" skipped
  Trace trace;
  double trace_origin = 0;
  // breakdown_steps: the last steps' events, kept to be summed per task at the end
  const int64_t summed_from = c.breakdown_steps > 0 ? std::max(start, last - c.breakdown_steps) : last;
  std::vector<TraceEvent> summed_events;
  std::vector<double> summed_step_ms;
  const std::vector<int> degree_cycle = degree_cycle_from_env();
  double rss_mb_early = NAN;
  for (int64_t step = start; step < last; ++step) {
    if (!degree_cycle.empty())  // the soak test: degrees change every step, bits must not
      for (MoeLayer* l : model.moe_layers()) {
        const int64_t cap = l->shape().capacity();
        l->set_degrees(static_cast<int>(std::min<int64_t>(degree_cycle[step % degree_cycle.size()], cap)),
                       static_cast<int>(std::min<int64_t>(degree_cycle[(step + 1) % degree_cycle.size()], cap)));
      }
    if (step - start == 10) rss_mb_early = comm.allreduce_scalar(resident_mb(), ReduceOp::max);
    const bool traced_file = !c.trace.empty() && step + 1 == last;
    const bool summed = step >= summed_from;
    const bool traced = traced_file || summed;
    if (traced) {
      if (traced_file) comm.barrier();
      trace_origin = now_s();
      model.set_trace(&trace);
      runner.set_trace(&trace);
    }
    if (layer_degrees) layer_degrees->before_step();
    Stopwatch step_watch;
    model.zero_grads();
    // micro-batch m of data group g draws the batch data group g * M + m would draw with one
    // micro-batch each: M micro-batches on one rank see what M ranks see
    const PipelineStepResult pass = runner.train_step(
        M, B, 1.0f / (stage_ranks * M),
        [&](int m, int32_t* inputs, int32_t* targets) {
          sample_batch(data.train, B, S, c.seed, stream_id(30, step, data_rank * M + m), inputs, targets);
        },
        grad_sync);
    const double loss = pass.loss, aux = pass.aux, z_loss = pass.z_loss, exposed_ms = pass.exposed_ms;
    held_most = std::max(held_most, pass.stashed_most);
    // the tied embedding: the first stage's gradient (its lookups) plus the last's (the head)
    if (groups.embedding)
      for (Parameter& p : model.parameters())
        if (p.name == "wte") groups.embedding->allreduce(p.grad->f32(), p.grad->f32(), p.grad->numel(), DType::f32, ReduceOp::sum);
    inject_nan_if_asked(model.parameters(), step + 1, rank);
    std::optional<TraceSpan> span(std::in_place, traced ? &trace : nullptr, "optimizer", 0);
    // clipped as the update reads the gradients (AdamW::step): one pass over them less
    const double grad_norm =
        global_grad_norm(model.parameters(), comm, stage_ranks / c.model.expert_ranks(stage_ranks), pipeline,
                         model.first_stage() ? "" : "wte");
    const double lr = learning_rate(c, step);
    if (step_not_finite(comm, loss, grad_norm)) {
      // named by every rank that saw it, agreed, then stop or skip the update on every rank alike
      std::vector<std::string> seen = comm.gather_strings(non_finite_report(model.parameters(), loss), 0);
      std::string where;
      for (std::size_t r = 0; r < seen.size(); ++r)
        if (!seen[r].empty()) where += fmt::format("{}rank {}: {}", where.empty() ? "" : "; ", r, seen[r]);
      where = comm.broadcast_string(where, 0);
      PM_REQUIRE(c.nan_policy == "skip",
                 "step {}: not finite: {}; stopped (nan_policy \"stop\"; \"skip\" skips such steps' updates)", step + 1,
                 where);
      ++skipped_in_a_row;
      log::info("warning: step {}: not finite: {}; its update skipped (nan_policy \"skip\")", step + 1, where);
      PM_REQUIRE(skipped_in_a_row < 10, "step {}: 10 steps in a row were not finite: stopped", step + 1);
    } else {
      skipped_in_a_row = 0;
      optimizer.step(c, lr, clip_scale(grad_norm, c.grad_clip));
      model.update_balance_bias();  // router_bias_rate > 0: against this step's load
    }
    span.reset();
    double step_ms = step_watch.elapsed_ms();
    // what the compute lane waited for: all-to-alls and gradient all-reduces not hidden
    // the loss from the last stage's ranks, every stage's MoE losses, times as every rank's mean
    double stats[6] = {loss, aux, step_ms, exposed_ms, z_loss, pass.wait_ms};
    comm.allreduce(stats, stats, 6, DType::f64, ReduceOp::sum);
    StepRecord record;
    record.step = step + 1;
    record.lr = lr;
    record.loss = stats[0] / stage_ranks;
    record.aux = stats[1] / stage_ranks;
    record.z_loss = stats[4] / stage_ranks;
    record.grad_norm = grad_norm;
    record.step_ms = stats[2] / P;
    record.exposed_ms = stats[3] / P;
    if (layout.pp > 1) {
      record.pipeline_wait_ms = stats[5] / P;
      if (step - start >= 2) bubble_all.push_back(record.pipeline_wait_ms / record.step_ms);
    }
    // degree auto with a profile: every layer's degrees from its own routing, after the first step
    // and every degree_replan_every steps (the routing drifts as the router learns), then timed
    if (layer_degrees) layer_degrees->after_step(step + 1, last, record.step_ms, step == start);
    moe_load(model, stage_comm, pipeline, c.model.experts, record);
    comm_hidden(model, stage_comm, pipeline, record);
    if (step - start >= 2) hidden_total += Overlap{record.comm_hidden_total_s, record.comm_hidden_s};
    if (step - start >= 2) step_ms_all.push_back(record.step_ms), exposed_all.push_back(record.exposed_ms);
    if (traced) {
      model.set_trace(nullptr);
      runner.set_trace(nullptr);
      if (traced_file) {
        trace.write_chrome_json(c.trace, trace_origin, comm.rank(), [&](const std::string& mine) { return comm.gather_strings(mine, 0); });
        log::info("trace of step {}: {}", step + 1, c.trace);
      }
      if (summed) {
        const std::vector<TraceEvent> events = trace.events();
        summed_events.insert(summed_events.end(), events.begin(), events.end());
        summed_step_ms.push_back(record.step_ms);
      }
      trace.clear();  // the file holds one step, the breakdown each of its steps once
    }
    double eval_s = 0;
    if ((step + 1) % c.eval_every == 0 || step + 1 == last) {
      Stopwatch eval_watch;
      record.val_loss = last_val = evaluate(runner, data, c, comm, layout);
      eval_s = eval_watch.elapsed_s();
    }
    if (plan_windows && !windows_shown && !model.backward_windows().empty()) {
      windows_shown = true;
      for (const nlohmann::json& w : window_json(model))
        log::info("ScMoE block {}: forward slot {} at degree {} (predicted {:.1f} ms, all-to-all {:.2f}x the "
                  "profile's), backward slot {} at degree {} (predicted {:.1f} ms, all-to-all {:.2f}x)",
                  w["block"].get<int>(), w["slot_fwd"].get<int>(), w["degree_fwd"].get<int>(),
                  w["predicted_fwd_ms"].get<double>(), w["comm_scale_fwd"].get<double>(), w.value("slot_bwd", 0),
                  w.value("degree_bwd", 0), w.value("predicted_bwd_ms", 0.0), w.value("comm_scale_bwd", 1.0));
    }
    train_log.record(record, join_over_stages(pipeline, moe_schedule(model, c.model.scmoe())), eval_s,
                     val_bytes_per_token, unigram);
    const bool save_now = !c.save.empty() && ((c.save_every > 0 && (step + 1) % c.save_every == 0) || step + 1 == last);
    if (save_now) {
      CheckpointState s{step + 1, c.to_json(), P, data.tokenizer.to_json(), {{"data", data.description}}};
      Stopwatch save_watch;
      std::string where = save_checkpoint(comm, c.save, model.parameters(), &optimizer, s,
                                          c.model.expert_ranks(stage_ranks), {&stage_comm, pipeline});
      log::info("checkpoint: {} (written in {:.1f} s)", where, save_watch.elapsed_s());
    }
  }
  train_log.close();
  // memory: the largest rank's resident set after 10 steps and at the end (flat in a soak), and its peak
  const double rss_mb_end = comm.allreduce_scalar(resident_mb(), ReduceOp::max);
  const double peak_rss_mb = comm.allreduce_scalar(peak_resident_mb(), ReduceOp::max);
  // what this rank's MoE layers kept from the last forward for its backward (one micro-batch)
  double moe_held_bytes = 0;
  for (const MoePass* pass : model.moe_passes()) moe_held_bytes += static_cast<double>(pass->held_bytes());
  const double moe_held_mb = comm.allreduce_scalar(moe_held_bytes / (1 << 20), ReduceOp::max);
  log::info("memory: peak {:.0f} MB on the largest rank; its MoE layers keep {:.1f} MB from a forward for the "
            "backward{}{}", peak_rss_mb, moe_held_mb, c.model.dtype == "bf16" ? " (bf16 where only GEMMs read it)" : "",
            c.model.recompute_experts() ? " (recompute experts: their inputs only, the rest made again in the backward)"
                                        : "");
  held_most = static_cast<int>(comm.allreduce_scalar(held_most, ReduceOp::max));
  std::vector<TaskTimeRow> breakdown;
  if (!summed_step_ms.empty()) {
    const int steps = static_cast<int>(summed_step_ms.size());
    breakdown = step_breakdown(comm, summed_events, steps);
    log_step_breakdown(breakdown, steps, summarize(summed_step_ms).median);
  }
  double ms = step_ms_all.empty() ? NAN : summarize(step_ms_all).median;
  double exposed = exposed_all.empty() ? NAN : summarize(exposed_all).median;
  return {{"train_loss", train_log.last_window_loss()},
          {"val_loss", last_val},
          {"unigram_entropy", unigram},
          {"unit", "nats per token"},
          {"val_bits_per_byte", last_val / std::log(2.0) / val_bytes_per_token},
          {"unigram_bits_per_byte", unigram / std::log(2.0) / val_bytes_per_token},
          {"tokens_per_s", tokens_per_step / (ms / 1e3)},
          {"degree_replan_ms", layer_degrees ? layer_degrees->planning_ms() : 0.0},
          {"degree_tuning", layer_degrees ? tuning_over_stages(pipeline, *layer_degrees) : nlohmann::json(nullptr)},
          {"steps", last},
          {"ms_per_step", ms},
          {"exposed_comm_ms_per_step", exposed},
          {"exposed_comm_share", exposed / ms},
          {"comm_hidden_share", hidden_total.total_s > 0 ? nlohmann::json(hidden_total.share()) : nlohmann::json(nullptr)},
          {"arch", c.model.arch},
          {"degree_fwd", model.moe_layers().empty() ? degrees.forward : model.moe_layers()[0]->forward_degree()},
          {"degree_bwd", model.moe_layers().empty() ? degrees.backward : model.moe_layers()[0]->backward_degree()},
          {"moe_schedule", join_over_stages(pipeline, moe_schedule(model, c.model.scmoe()))},
          {"scmoe_windows", window_json(model)},
          {"world_size", P},
          {"rss_mb_step_10", std::isfinite(rss_mb_early) ? nlohmann::json(rss_mb_early) : nlohmann::json(nullptr)},
          {"rss_mb_end", rss_mb_end},
          {"peak_rss_mb", peak_rss_mb},
          {"moe_held_for_backward_mb", moe_held_mb},
          {"parameters", n_params},
          {"dtype", c.model.dtype},
          {"tp", layout.tp},
          {"dp", layout.dp},
          {"pp", layout.pp},
          {"micro_batches", M},
          // the share of a step the stages waited for each other (the bubble and the links), against
          // 1F1B's (S - 1) / (M + S - 1)
          {"pipeline_bubble", bubble_all.empty() ? nlohmann::json(nullptr) : nlohmann::json(summarize(bubble_all).median)},
          {"pipeline_bubble_formula", pipeline_bubble_formula(layout.pp, M)},
          // the micro-batches a stage kept aside at once (1F1B: S on the first stage; GPipe: M);
          // with one stage none (each forward's backward comes next)
          {"micro_batches_stashed_most", held_most},
          {"log_csv", train_log.csv_path()},
          {"step_breakdown_ms", summed_step_ms.empty() ? nlohmann::json(nullptr) : task_time_json(breakdown)}};
}

}  // namespace pm
