#include "model/train_config.h"

#include "model/pipeline_schedule.h"
#include "model/stage_split.h"

#include <cmath>
#include <filesystem>
#include <limits>
#include <fstream>
#include <sstream>

#include <unistd.h>

#include "core/error.h"
#include "core/json_input.h"
#include "model/pipeline_schedule.h"
#include "moe/moe_layer.h"

namespace pm {

double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * page : 0.0;
}

int ModelConfig::moe_layers() const {
  int n = 0;
  for (int l = 0; l < layers; ++l) n += is_moe(l);
  return n;
}

namespace {

// Every key, with a reference to its field: the one list that to_json and apply share.
template <typename Fn>
void for_each_key(TrainConfig& c, Fn&& fn) {
  fn("seq_len", c.model.seq_len);
  fn("d_model", c.model.d_model);
  fn("layers", c.model.layers);
  fn("heads", c.model.heads);
  fn("kv_heads", c.model.kv_heads);
  fn("mlp_hidden", c.model.mlp_hidden);
  fn("norm", c.model.norm);
  fn("position", c.model.position);
  fn("rope_theta", c.model.rope_theta);
  fn("mlp_activation", c.model.mlp_activation);
  fn("moe_every", c.model.moe_every);
  fn("first_dense_blocks", c.model.first_dense_blocks);
  fn("experts", c.model.experts);
  fn("top_k", c.model.top_k);
  fn("capacity_factor", c.model.capacity_factor);
  fn("drop_policy", c.model.drop_policy);
  fn("expert_hidden", c.model.expert_hidden);
  fn("expert_activation", c.model.expert_activation);
  fn("moe_strategy", c.model.moe_strategy);
  fn("tp", c.model.tp);
  fn("arch", c.model.arch);
  fn("scmoe_tap", c.model.scmoe_tap);
  fn("scmoe_slot", c.model.scmoe_slot);
  fn("shared_expert_hidden", c.model.shared_expert_hidden);
  fn("shared_expert_activation", c.model.shared_expert_activation);
  fn("coef_gate", c.model.coef_gate);
  fn("aux_coef", c.model.aux_coef);
  fn("aux_loss", c.model.aux_loss);
  fn("z_loss_coef", c.model.z_loss_coef);
  fn("gate_normalize", c.model.gate_normalize);
  fn("routed_scaling_factor", c.model.routed_scaling_factor);
  fn("router_score", c.model.router_score);
  fn("route_groups", c.model.route_groups);
  fn("route_top_groups", c.model.route_top_groups);
  fn("dtype", c.model.dtype);
  fn("router_bias_rate", c.model.router_bias_rate);
  fn("dedup_dispatch", c.model.dedup_dispatch);
  fn("recompute", c.model.recompute);
  fn("batch_size", c.batch_size);
  fn("dp", c.dp);
  fn("pp", c.pp);
  fn("micro_batches", c.micro_batches);
  fn("pipeline_schedule", c.pipeline_schedule);
  fn("pipeline_split", c.pipeline_split);
  fn("tp_dense", c.model.tp_dense);
  fn("max_steps", c.max_steps);
  fn("stop_at", c.stop_at);
  fn("lr", c.lr);
  fn("min_lr", c.min_lr);
  fn("warmup_steps", c.warmup_steps);
  fn("weight_decay", c.weight_decay);
  fn("beta1", c.beta1);
  fn("beta2", c.beta2);
  fn("adam_eps", c.adam_eps);
  fn("grad_clip", c.grad_clip);
  fn("overlap_grad_allreduce", c.overlap_grad_allreduce);
  fn("eval_every", c.eval_every);
  fn("eval_batches", c.eval_batches);
  fn("log_every", c.log_every);
  fn("seed", c.seed);
  fn("data", c.data);
  fn("tokenizer_vocab", c.tokenizer_vocab);
  fn("save", c.save);
  fn("save_every", c.save_every);
  fn("resume", c.resume);
  fn("degree", c.degree);
  fn("grad_allreduce_dtype", c.grad_allreduce_dtype);
  fn("bf16_order", c.bf16_order);
  fn("degree_replan_every", c.degree_replan_every);
  fn("degree_tune", c.degree_tune);
  fn("degree_tune_rounds", c.degree_tune_rounds);
  fn("degree_tune_window", c.degree_tune_window);
  fn("scmoe_plan", c.scmoe_plan);
  fn("nan_policy", c.nan_policy);
  fn("profile", c.profile);
  fn("trace", c.trace);
  fn("breakdown_steps", c.breakdown_steps);
  fn("log_csv", c.log_csv);
  fn("plot", c.plot);
}

}  // namespace

nlohmann::json TrainConfig::to_json() const {
  nlohmann::json j;
  for_each_key(const_cast<TrainConfig&>(*this), [&](const char* key, auto& field) { j[key] = field; });
  return j;
}

namespace {

bool is_path_key(const std::string& key) {
  for (const char* k : {"data", "save", "resume", "profile", "trace", "log_csv", "plot"})
    if (key == k) return true;
  return false;
}

}  // namespace

void TrainConfig::apply(const nlohmann::json& j, const std::string& source, const std::string& base_dir) {
  PM_REQUIRE(j.is_object(), "{}: the configuration must be a JSON object", source);
  for (const auto& item : j.items()) {
    const std::string& key = item.key();  // not a structured binding: lambdas below capture them
    const nlohmann::json& value = item.value();
    bool known = false;
    for_each_key(*this, [&](const char* name, auto& field) {
      if (key != name) return;
      known = true;
      using T = std::decay_t<decltype(field)>;
      try {
        if constexpr (std::is_same_v<T, std::string>) {
          // a number is taken as its text: `--set degree=2` and "degree": 2 mean "2" (each key's
          // own check then says whether that text is valid for it)
          PM_REQUIRE(value.is_string() || value.is_number(), "{}: '{}' must be a string, got {}", source, key,
                     brief(value));
        } else if constexpr (std::is_same_v<T, bool>) {
          PM_REQUIRE(value.is_boolean(), "{}: '{}' must be true or false, got {}", source, key, brief(value));
        } else {
          PM_REQUIRE(value.is_number(), "{}: '{}' must be a number, got {}", source, key, brief(value));
          if constexpr (std::is_integral_v<T>) {
            // whole, and inside the field's range: never cut to 32 bits
            const double d = value.get<double>();
            const bool whole = value.is_number_integer() || (std::isfinite(d) && d == std::floor(d));
            PM_REQUIRE(whole, "{}: '{}' must be a whole number, got {}", source, key, brief(value));
            constexpr T lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
            bool fits;
            if (value.is_number_unsigned()) {
              fits = value.get<uint64_t>() <= static_cast<uint64_t>(hi);
            } else if (value.is_number_integer()) {  // stored signed (a flag's int64, or negative)
              const int64_t v = value.get<int64_t>();
              fits = v >= 0 ? static_cast<uint64_t>(v) <= static_cast<uint64_t>(hi)
                            : std::is_signed_v<T> && v >= static_cast<int64_t>(lo);
            } else {
              fits = d >= static_cast<double>(lo) && d <= static_cast<double>(hi);
            }
            PM_REQUIRE(fits, "{}: '{}' is out of range: {} (from {} to {})", source, key, brief(value),
                       std::numeric_limits<T>::min(), std::numeric_limits<T>::max());
          } else {
            PM_REQUIRE(std::isfinite(value.get<double>()), "{}: '{}' must be finite, got {}", source, key, brief(value));
          }
        }
        if constexpr (std::is_same_v<T, std::string>)
          field = value.is_number() ? value.dump() : value.get<std::string>();
        else
          field = value.get<T>();
        if constexpr (std::is_same_v<T, std::string>) {
          std::filesystem::path path(field);
          const bool no_file = key == "plot" && field == "none";  // a word, not a path
          if (!base_dir.empty() && !field.empty() && !no_file && is_path_key(key) && path.is_relative())
            field = std::filesystem::absolute(std::filesystem::path(base_dir) / path).lexically_normal().string();
        }
      } catch (const nlohmann::json::exception& e) {
        throw Error(ErrorKind::usage, fmt::format("{}: bad value for '{}': {}", source, key, e.what()));
      }
    });
    PM_REQUIRE(known, "{}: unknown configuration key '{}'", source, key);
  }
}

double TrainConfig::estimated_bytes_per_rank(int world) const {
  const ModelConfig& m = model;
  const double V = tokenizer_vocab, S = m.seq_len, D = m.d_model, T = static_cast<double>(batch_size) * S;
  const double moe = m.moe_every > 0 ? m.moe_layers() : 0, dense = m.layers - moe;
  const double local_experts = moe > 0 ? std::max(1.0, static_cast<double>(m.experts) / std::max(m.expert_ranks(world / std::max(pp, 1)), 1)) : 0;
  // parameters: embeddings, attention, dense MLPs, and per MoE block its gate, experts and shared
  // expert (an expert's two matrices are 2 D H, or 3 D H with SwiGLU)
  const double expert_matrices = m.expert_activation == "swiglu" ? 3 : 2;
  const double mlp_matrices = m.mlp_activation == "swiglu" ? 3 : 2;
  const double Dkv = D * m.kv_heads_or_all() / std::max(m.heads, 1);  // keys' and values' width
  double params = (V + (m.rope() ? 0 : S)) * D + m.layers * (2 * D * D + 2 * D * Dkv + 6 * D) + dense * mlp_matrices * D * m.mlp_hidden +
                  moe * (D * m.experts + local_experts * expert_matrices * D * m.expert_hidden +
                         (m.shared_expert_activation == "swiglu" ? 3 : 2) * D * m.shared_expert_hidden + 2 * D);
  // activations kept for the backward, per block: ~16 rows of D, the MLP's or the experts' hidden
  // rows, the attention probabilities; and the logits with their gradient
  const double rows = T * std::max(1, m.top_k) * std::max(1.0, m.capacity_factor);
  double activations = m.layers * (16 * T * D + T * S * m.heads) + dense * (mlp_matrices + 1) * T * m.mlp_hidden +
                       moe * ((1 + expert_matrices) * rows * m.expert_hidden + 4 * rows * D + (m.shared_expert_activation == "swiglu" ? 4 : 3) * T * m.shared_expert_hidden) + 2 * T * V;
  return 4.0 * (4 * params + activations);  // float32; value, gradient and two AdamW moments per parameter
}

void TrainConfig::validate(int world) const {
  const ModelConfig& m = model;
  auto positive = [](const char* key, double v) { PM_REQUIRE(v > 0, "configuration: '{}' must be positive, got {}", key, v); };
  positive("seq_len", m.seq_len);
  positive("d_model", m.d_model);
  positive("layers", m.layers);
  positive("heads", m.heads);
  positive("mlp_hidden", m.mlp_hidden);
  positive("batch_size", batch_size);
  positive("max_steps", max_steps);
  positive("lr", lr);
  positive("eval_batches", eval_batches);
  positive("log_every", log_every);
  positive("eval_every", eval_every);
  PM_REQUIRE(degree_replan_every >= 0, "configuration: 'degree_replan_every' must be 0 (never) or a number of steps, got {}",
             degree_replan_every);
  PM_REQUIRE(degree_tune == "auto" || degree_tune == "on" || degree_tune == "off",
             "configuration: 'degree_tune' must be \"auto\", \"on\" or \"off\", got '{}'", degree_tune);
  positive("degree_tune_rounds", degree_tune_rounds);
  PM_REQUIRE(grad_allreduce_dtype == "fp32" || grad_allreduce_dtype == "bf16",
             "configuration: 'grad_allreduce_dtype' must be \"fp32\" or \"bf16\", got '{}'", grad_allreduce_dtype);
  PM_REQUIRE(bf16_order.empty() || bf16_order == "dot" || bf16_order == "amx" || bf16_order == "auto",
             "configuration: 'bf16_order' must be \"dot\", \"amx\" or \"auto\", got '{}'", bf16_order);
  PM_REQUIRE(degree_tune_window >= 0, "configuration: 'degree_tune_window' must be at least 0, got {}", degree_tune_window);
  // sizes no run can have, refused before anything is allocated
  auto at_most = [](const char* key, int64_t v, int64_t max) {
    PM_REQUIRE(v <= max, "configuration: '{}' must be at most {}, got {}", key, max, v);
  };
  at_most("seq_len", m.seq_len, 1 << 16);
  at_most("d_model", m.d_model, 1 << 16);
  at_most("layers", m.layers, 1024);
  at_most("mlp_hidden", m.mlp_hidden, 1 << 20);
  at_most("experts", m.experts, 1 << 14);
  at_most("expert_hidden", m.expert_hidden, 1 << 20);
  at_most("shared_expert_hidden", m.shared_expert_hidden, 1 << 20);
  at_most("batch_size", batch_size, 1 << 20);
  PM_REQUIRE(m.tp >= 1 && world % m.tp == 0,
             "configuration: 'tp' (ranks per tensor-parallel group) must divide the {} ranks, got {}", world, m.tp);
  PM_REQUIRE(micro_batches >= 1 && micro_batches <= 4096,
             "configuration: 'micro_batches' must be 1 to 4096, got {}", micro_batches);
  PM_REQUIRE(pp >= 1 && world % (m.tp * pp) == 0,
             "configuration: 'pp' {} x tp {} does not divide the {} ranks (the layout is tp x dp x pp)", pp, m.tp, world);
  PM_REQUIRE(pp <= m.layers, "configuration: 'pp' {}: more pipeline stages than the model's {} blocks", pp, m.layers);
  parse_pipeline_schedule(pipeline_schedule, "configuration: 'pipeline_schedule'");
  stage_starts(m, tokenizer_vocab, pp, pipeline_split);  // a usage error for a split that is not one
  PM_REQUIRE(pp == 1 || pipeline_schedule != "1f1b" || micro_batches >= pp,
             "configuration: 1F1B over {} pipeline stages needs at least {} micro-batches per step, got micro_batches "
             "{} (set micro_batches, or pipeline_schedule gpipe)",
             pp, pp, micro_batches);
  PM_REQUIRE(dp == 0 || dp * m.tp * pp == world,
             "configuration: the layout tp {} x dp {} x pp {} = {} ranks, but this run has {}", m.tp, dp, pp,
             m.tp * dp * pp, world);
  PM_REQUIRE(m.tp == 1 || m.moe_strategy == "ppmoe",
             "configuration: 'tp' {} needs moe_strategy ppmoe (the all-to-all strategy spreads the experts over all "
             "ranks)", m.tp);
  PM_REQUIRE(m.tp_dense == "split" || m.tp_dense == "replicate",
             "configuration: 'tp_dense' must be \"split\" (Megatron-style) or \"replicate\", got \"{}\"", m.tp_dense);
  PM_REQUIRE(m.heads % m.dense_tp() == 0,
             "configuration: {} attention heads do not divide over tensor-parallel groups of {} ranks (or set tp_dense "
             "replicate)", m.heads, m.dense_tp());
  PM_REQUIRE(m.mlp_hidden % m.dense_tp() == 0,
             "configuration: mlp_hidden {} does not divide over tensor-parallel groups of {} ranks (or set tp_dense "
             "replicate)", m.mlp_hidden, m.dense_tp());
  PM_REQUIRE(m.moe_layers() == 0 || m.experts % m.tp == 0,
             "configuration: {} experts do not divide over tensor-parallel groups of {} ranks", m.experts, m.tp);
  PM_REQUIRE(m.d_model % m.heads == 0, "configuration: d_model {} must be a multiple of heads {}", m.d_model, m.heads);
  PM_REQUIRE(m.kv_heads >= 0 && m.kv_heads <= m.heads && m.heads % m.kv_heads_or_all() == 0,
             "configuration: 'kv_heads' must divide the {} heads (0: as many as heads), got {}", m.heads, m.kv_heads);
  PM_REQUIRE(m.kv_heads_or_all() % m.dense_tp() == 0,
             "configuration: {} key/value heads do not divide over tensor-parallel groups of {} ranks (or set tp_dense "
             "replicate)", m.kv_heads_or_all(), m.dense_tp());
  PM_REQUIRE(m.norm == "layernorm" || m.norm == "rmsnorm",
             "configuration: 'norm' must be \"layernorm\" or \"rmsnorm\", got \"{}\"", m.norm);
  PM_REQUIRE(m.position == "learned" || m.position == "rope",
             "configuration: 'position' must be \"learned\" (a position embedding) or \"rope\" (rotary), got \"{}\"",
             m.position);
  PM_REQUIRE(std::isfinite(m.rope_theta) && m.rope_theta > 1,
             "configuration: 'rope_theta' (the rotary embedding's base) must be above 1, got {}", m.rope_theta);
  PM_REQUIRE(!m.rope() || (m.d_model / m.heads) % 2 == 0,
             "configuration: rotary embeddings turn pairs of a head's values: the head size d_model / heads = {} "
             "must be even", m.d_model / m.heads);
  parse_activation(m.mlp_activation, "configuration: 'mlp_activation'");
  const double need = estimated_bytes_per_rank(world), have = physical_memory_bytes();
  PM_REQUIRE(have <= 0 || need <= have,
             "configuration: this model needs about {:.1f} GiB per rank (weights, gradients, AdamW state and "
             "activations of batch_size {} x seq_len {}), more than this machine's {:.1f} GiB",
             need / (1 << 30), batch_size, m.seq_len, have / (1 << 30));
  PM_REQUIRE(m.moe_every >= 0, "configuration: 'moe_every' must be 0 (no MoE) or positive, got {}", m.moe_every);
  PM_REQUIRE(m.first_dense_blocks >= 0, "configuration: 'first_dense_blocks' must not be negative, got {}",
             m.first_dense_blocks);
  PM_REQUIRE(m.first_dense_blocks == 0 || m.moe_every == 0 || m.moe_layers() > 0,
             "configuration: 'first_dense_blocks' {} with moe_every {} leaves no MoE block among the {} layers",
             m.first_dense_blocks, m.moe_every, m.layers);
  if (m.moe_layers() > 0) {
    positive("experts", m.experts);
    positive("expert_hidden", m.expert_hidden);
    PM_REQUIRE(m.top_k >= 1 && m.top_k <= m.experts, "configuration: 'top_k' must be between 1 and experts ({}), got {}",
               m.experts, m.top_k);
    PM_REQUIRE(m.capacity_factor >= 0 && std::isfinite(m.capacity_factor),
               "configuration: 'capacity_factor' must be positive, or 0 for dropless routing, got {}", m.capacity_factor);
    moe_strategy(m.moe_strategy);  // a usage error naming the known ones
    parse_drop_policy(m.drop_policy, "configuration: 'drop_policy'");
    PM_REQUIRE(m.shared_expert_hidden >= 0, "configuration: 'shared_expert_hidden' must be 0 (none) or positive, got {}",
               m.shared_expert_hidden);
    PM_REQUIRE(m.scmoe_slot >= -1, "configuration: 'scmoe_slot' must be -1 (auto) or a number of dense tasks, got {}",
               m.scmoe_slot);
    PM_REQUIRE(m.experts % m.expert_ranks(world / pp) == 0,
               "configuration: {} experts cannot be spread evenly over {} ranks: experts must be a multiple of the "
               "number of ranks{}",
               m.experts, m.expert_ranks(world / pp), pp > 1 ? " of a pipeline stage" : "");
    PM_REQUIRE(m.route_groups >= 1 && m.experts % m.route_groups == 0,
               "configuration: 'route_groups' must divide the {} experts into groups of the same size, got {}",
               m.experts, m.route_groups);
    PM_REQUIRE(m.route_top_groups >= 0 && m.route_top_groups <= m.route_groups,
               "configuration: 'route_top_groups' must be between 1 and route_groups ({}), or 0 for every group, got {}",
               m.route_groups, m.route_top_groups);
    const int allowed = m.route_top_groups == 0 ? m.experts : m.route_top_groups * (m.experts / m.route_groups);
    PM_REQUIRE(m.top_k <= allowed,
               "configuration: 'top_k' {} is more than the {} experts of the route_top_groups {} best of route_groups "
               "{} a token may choose from",
               m.top_k, allowed, m.route_top_groups, m.route_groups);
  }
  PM_REQUIRE(m.arch == "moe" || m.arch == "scmoe", "configuration: 'arch' must be \"moe\" or \"scmoe\", got \"{}\"",
             m.arch);
  PM_REQUIRE(m.scmoe_tap == "pos1" || m.scmoe_tap == "pos2" || m.scmoe_tap == "pos3",
             "configuration: 'scmoe_tap' must be pos1 (the preceding block's output), pos2 (between its attention and "
             "MLP) or pos3 (its input), got \"{}\"",
             m.scmoe_tap);
  if (m.scmoe()) {
    PM_REQUIRE(m.moe_layers() > 0, "configuration: arch scmoe needs MoE blocks ('moe_every' > 0)");
    PM_REQUIRE(m.moe_every >= 2 || m.scmoe_tap == "pos1",
               "configuration: with an MoE in every block ('moe_every' 1) ScMoE can only tap pos1, the preceding "
               "block's output (pos2 and pos3 would reach into another MoE block); got {}",
               m.scmoe_tap);
    PM_REQUIRE(m.shared_expert_hidden > 0,
               "configuration: arch scmoe needs a shared expert on the current representation: set "
               "'shared_expert_hidden' (e.g. to expert_hidden)");
    // a stage's first block cannot tap the block before it: that one lives on another stage
    const std::vector<int> starts = stage_starts(m, tokenizer_vocab, pp, pipeline_split);
    for (int s = 1; s < pp && m.scmoe_tap != "pos1"; ++s) {
      const int first = starts[s];
      PM_REQUIRE(!m.is_moe(first),
                 "configuration: ScMoE block {} taps block {} ({}), which pipeline stage {} leaves to stage {}: choose "
                 "a pp whose stages start at dense blocks, or scmoe_tap pos1",
                 first, first - 1, m.scmoe_tap, s, s - 1);
    }
  }
  PM_REQUIRE(m.aux_coef >= 0, "configuration: 'aux_coef' must not be negative, got {}", m.aux_coef);
  PM_REQUIRE(m.aux_loss == "gshard" || m.aux_loss == "sequence",
             "configuration: 'aux_loss' must be \"gshard\" (over a rank's tokens) or \"sequence\" (DeepSeek-V3's, "
             "per sequence), got \"{}\"",
             m.aux_loss);
  PM_REQUIRE(m.routed_scaling_factor > 0 && std::isfinite(m.routed_scaling_factor),
             "configuration: 'routed_scaling_factor' must be positive, got {}", m.routed_scaling_factor);
  parse_activation(m.expert_activation, "configuration: 'expert_activation'");
  parse_activation(m.shared_expert_activation, "configuration: 'shared_expert_activation'");
  parse_router_score(m.router_score, "configuration: 'router_score'");
  parse_precision(m.dtype, "configuration: 'dtype'");
  PM_REQUIRE(m.recompute == "none" || m.recompute == "experts",
             "configuration: 'recompute' must be \"none\" or \"experts\", got \"{}\"", m.recompute);
  PM_REQUIRE(m.z_loss_coef >= 0, "configuration: 'z_loss_coef' must not be negative, got {}", m.z_loss_coef);
  PM_REQUIRE(m.router_bias_rate >= 0, "configuration: 'router_bias_rate' must not be negative (0: no bias), got {}",
             m.router_bias_rate);
  PM_REQUIRE(min_lr >= 0 && min_lr <= lr, "configuration: 'min_lr' must be between 0 and lr ({}), got {}", lr, min_lr);
  PM_REQUIRE(warmup_steps >= 0 && save_every >= 0, "configuration: 'warmup_steps' and 'save_every' must not be negative");
  PM_REQUIRE(breakdown_steps >= 0, "configuration: 'breakdown_steps' must not be negative, got {}", breakdown_steps);
  PM_REQUIRE(stop_at >= 0 && stop_at <= max_steps, "configuration: 'stop_at' must be between 0 and max_steps ({}), got {}",
             max_steps, stop_at);
  PM_REQUIRE(weight_decay >= 0 && grad_clip >= 0, "configuration: 'weight_decay' and 'grad_clip' must not be negative");
  PM_REQUIRE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "configuration: 'beta1' and 'beta2' must be in [0, 1)");
  PM_REQUIRE(adam_eps > 0, "configuration: 'adam_eps' must be positive");
  PM_REQUIRE(nan_policy == "stop" || nan_policy == "skip",
             "configuration: 'nan_policy' must be \"stop\" or \"skip\", got \"{}\"", nan_policy);
  PM_REQUIRE(scmoe_plan == "window" || scmoe_plan == "rule",
             "configuration: 'scmoe_plan' must be \"window\" (slot and degree planned together) or \"rule\" (the "
             "layer's planned degree, ScMoE's slot rule), got \"{}\"",
             scmoe_plan);
  PM_REQUIRE(tokenizer_vocab >= 256 && tokenizer_vocab <= 65536, "configuration: 'tokenizer_vocab' must be 256 to 65536, got {}",
             tokenizer_vocab);
  PM_REQUIRE(!data.empty(), "configuration: 'data' must name a corpus folder or a text file");
}

TrainConfig load_train_config(const std::string& path) {
  std::ifstream in(path);
  PM_REQUIRE(in.good(), "cannot read configuration file {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_train_config(ss.str(), path, std::filesystem::absolute(path).parent_path().string());
}

TrainConfig parse_train_config(const std::string& text, const std::string& source, const std::string& base_dir) {
  nlohmann::json j = parse_json_input(text, source, "is not valid JSON", std::size_t{1} << 20);
  TrainConfig c;
  c.apply(j, source, base_dir);
  return c;
}

void apply_set_option(nlohmann::json& overrides, const std::string& kv) {
  auto eq = kv.find('=');
  PM_REQUIRE(eq != std::string::npos && eq > 0, "--set takes key=value, got '{}'", kv.substr(0, 80));
  std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
  PM_REQUIRE(json_depth(value) <= kMaxJsonDepth, "--set {}: the value is nested more than {} deep", key, kMaxJsonDepth);
  try {
    overrides[key] = nlohmann::json::parse(value);
  } catch (const std::exception&) {
    overrides[key] = value;
  }
}

}  // namespace pm
