#include <map>

#include "apps/pipemoe/command.h"

namespace pm::cli {

void add_layer_shape_options(CLI::App* cmd, MoeShape& s) {
  cmd->add_option("--tokens", s.tokens, "tokens per rank (T)")->capture_default_str();
  cmd->add_option("--model-dim", s.model_dim, "model dimension (M)")->capture_default_str();
  cmd->add_option("--hidden", s.hidden, "expert hidden dimension (H)")->capture_default_str();
  cmd->add_option("--experts", s.experts, "experts over all ranks (E)")->capture_default_str();
  cmd->add_option("--top-k", s.top_k, "experts per token (k)")->capture_default_str();
  cmd->add_option("--capacity-factor", s.capacity_factor, "capacity factor (f); 0: dropless")->capture_default_str();
  cmd->add_option("--gate-normalize", s.normalize_gates,
                  "top-k > 1: divide the gate values by their sum (true) or keep the probabilities (false)")
      ->capture_default_str();
  cmd->add_flag("--balance-bias", s.balance_bias,
                "auxiliary-loss-free balancing: a per-expert bias added to the scores to choose (DeepSeek-V3)");
  const std::map<std::string, RouterScore> scores{{"softmax", RouterScore::softmax}, {"sigmoid", RouterScore::sigmoid}};
  cmd->add_option("--router-score", s.router_score,
                  "the router's scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3)")
      ->transform(CLI::CheckedTransformer(scores))
      ->default_str("softmax");
  add_activation_option(cmd, "--activation", s.activation, "the experts' activation: gelu, or swiglu (W1 is [M, 2H])");
  add_dtype_option(cmd, s.precision,
                   "fp32, or bf16: the expert GEMMs read bf16 operands (fp32 accumulation) and the all-to-all "
                   "payloads travel as bf16");
}

void add_dtype_option(CLI::App* cmd, Precision& dtype, const std::string& help) {
  const std::map<std::string, Precision> dtypes{{"fp32", Precision::fp32}, {"bf16", Precision::bf16}};
  cmd->add_option("--dtype", dtype, help)->transform(CLI::CheckedTransformer(dtypes))->default_str("fp32");
}

void add_activation_option(CLI::App* cmd, const std::string& flag, Activation& activation, const std::string& help) {
  const std::map<std::string, Activation> activations{{"gelu", Activation::gelu}, {"swiglu", Activation::swiglu}};
  cmd->add_option(flag, activation, help)->transform(CLI::CheckedTransformer(activations))->default_str("gelu");
}

}  // namespace pm::cli
