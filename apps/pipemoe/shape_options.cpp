#include <map>

#include "apps/pipemoe/command.h"

namespace pm::cli {
namespace {

// A flag taking one of a few names, stored as the enum value each names. (CLI11's transformers
// print a uint8_t enum's values as characters, in the help and in the error for a wrong name.)
template <typename E>
void add_enum_option(CLI::App* cmd, const std::string& flag, E& target, const std::map<std::string, E>& names,
                     const std::string& default_name, const std::string& help) {
  std::string choices;
  for (const auto& [name, value] : names) choices += (choices.empty() ? "" : "|") + name;
  cmd->add_option_function<std::string>(
         flag,
         [&target, names, flag, choices](const std::string& value) {
           auto it = names.find(value);
           if (it == names.end())
             throw CLI::ValidationError(flag, "unknown value '" + value + "' (one of " + choices + ")");
           target = it->second;
         },
         help)
      ->type_name(choices)
      ->default_str(default_name);
}

}  // namespace

void add_layer_shape_options(CLI::App* cmd, MoeShape& s) {
  cmd->add_option("--tokens", s.tokens, "tokens per rank (T)")->capture_default_str();
  cmd->add_option("--model-dim", s.model_dim, "model dimension (M)")->capture_default_str();
  cmd->add_option("--hidden", s.hidden, "expert hidden dimension (H)")->capture_default_str();
  cmd->add_option("--experts", s.experts, "experts over all ranks (E)")->capture_default_str();
  cmd->add_option("--top-k", s.top_k, "experts per token (k)")->capture_default_str();
  cmd->add_option("--capacity-factor", s.capacity_factor, "capacity factor (f); 0: dropless")->capture_default_str();
  add_enum_option(cmd, "--drop-policy", s.drop_policy, {{"position", DropPolicy::position}, {"probs", DropPolicy::probs}},
                  "position", "which choices an expert over its capacity drops: the last in filling order "
                  "(GShard), or the smallest gate values (Megatron-Core's probs)");
  cmd->add_option("--gate-normalize", s.normalize_gates,
                  "top-k > 1: divide the gate values by their sum (true) or keep the probabilities (false)")
      ->capture_default_str();
  cmd->add_option("--routed-scaling-factor", s.routed_scale,
                  "the gate values times this, after any normalisation (DeepSeek-V3: 2.5)")
      ->capture_default_str();
  cmd->add_option("--aux-seq-len", s.aux_seq_len,
                  "0: GShard's balance loss over the rank's tokens; N: DeepSeek-V3's sequence-wise one over each "
                  "run of N tokens")
      ->capture_default_str();
  cmd->add_flag("--balance-bias", s.balance_bias,
                "auxiliary-loss-free balancing: a per-expert bias added to the scores to choose (DeepSeek-V3)");
  cmd->add_option("--dedup-dispatch", s.dedup_dispatch,
                  "top-k > 1: the expert-parallel dispatch sends a token's row once per rank, not once "
                  "per chosen expert, and the backward's dispatch its dy once per rank in float32 where that "
                  "takes fewer bytes (true; DeepEP's deduplication: the same results, fewer bytes), or every row (false)")
      ->capture_default_str();
  add_enum_option(cmd, "--recompute", s.recompute_experts, {{"none", false}, {"experts", true}}, "none",
                  "experts: the routed experts keep only their inputs from the forward and the backward makes "
                  "the rest again (the same results, less memory held for the backward, more arithmetic)");
  add_enum_option(cmd, "--router-score", s.router_score, {{"softmax", RouterScore::softmax}, {"sigmoid", RouterScore::sigmoid}},
                  "softmax", "the router's scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3)");
  cmd->add_option("--route-groups", s.route_groups,
                  "group-limited routing (DeepSeek-V3's n_group): the experts in this many groups of consecutive "
                  "experts, each scored by its two best scores")
      ->capture_default_str();
  cmd->add_option("--route-top-groups", s.route_top_groups,
                  "group-limited routing (DeepSeek-V3's topk_group): a token chooses its experts within its this "
                  "many best groups (0: every group)")
      ->capture_default_str();
  add_activation_option(cmd, "--activation", s.activation, "the experts' activation: gelu, or swiglu (W1 is [M, 2H])");
  add_dtype_option(cmd, s.precision,
                   "fp32, or bf16: the expert GEMMs read bf16 operands (fp32 accumulation) and the all-to-all "
                   "payloads travel as bf16");
}

void add_dtype_option(CLI::App* cmd, Precision& dtype, const std::string& help) {
  add_enum_option(cmd, "--dtype", dtype, {{"fp32", Precision::fp32}, {"bf16", Precision::bf16}}, "fp32", help);
}

void add_activation_option(CLI::App* cmd, const std::string& flag, Activation& activation, const std::string& help) {
  add_enum_option(cmd, flag, activation, {{"gelu", Activation::gelu}, {"swiglu", Activation::swiglu}}, "gelu", help);
}

}  // namespace pm::cli
