#include "apps/pipemoe/command.h"

namespace pm::cli {

void add_layer_shape_options(CLI::App* cmd, int64_t& tokens, int64_t& model_dim, int64_t& hidden, int& experts,
                             int& top_k, double& capacity_factor) {
  cmd->add_option("--tokens", tokens, "tokens per rank (T)")->capture_default_str();
  cmd->add_option("--model-dim", model_dim, "model dimension (M)")->capture_default_str();
  cmd->add_option("--hidden", hidden, "expert hidden dimension (H)")->capture_default_str();
  cmd->add_option("--experts", experts, "experts over all ranks (E)")->capture_default_str();
  cmd->add_option("--top-k", top_k, "experts per token (k)")->capture_default_str();
  cmd->add_option("--capacity-factor", capacity_factor, "capacity factor (f)")->capture_default_str();
}

}  // namespace pm::cli
