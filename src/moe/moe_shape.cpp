#include "moe/moe_shape.h"

#include <cmath>

#include "core/error.h"
#include "moe/routing.h"

namespace pm {

void MoeShape::validate() const {
  PM_REQUIRE(tokens > 0, "number of tokens must be positive, got {}", tokens);
  PM_REQUIRE(model_dim > 0, "model dim must be positive, got {}", model_dim);
  PM_REQUIRE(hidden > 0, "hidden dim must be positive, got {}", hidden);
  PM_REQUIRE(experts > 0, "number of experts must be positive, got {}", experts);
  PM_REQUIRE(top_k >= 1 && top_k <= experts, "top-k must be between 1 and the number of experts ({}), got {}",
             experts, top_k);
  PM_REQUIRE(capacity_factor >= 0 && std::isfinite(capacity_factor),
             "capacity factor must be positive, or 0 for dropless routing (no capacity), got {}", capacity_factor);
  PM_REQUIRE(ranks >= 1, "the expert group needs at least one rank, got {}", ranks);
  PM_REQUIRE(experts % ranks == 0,
             "{} experts cannot be spread evenly over {} ranks: the number of experts must be a "
             "multiple of the number of ranks",
             experts, ranks);
  PM_REQUIRE(routed_scale > 0 && std::isfinite(routed_scale), "routed scaling factor must be positive, got {}",
             routed_scale);
  PM_REQUIRE(aux_seq_len >= 0 && (aux_seq_len == 0 || tokens % aux_seq_len == 0),
             "the sequence-wise balance loss needs the {} tokens in whole sequences of aux seq len, got {}", tokens,
             aux_seq_len);
  PM_REQUIRE(route_groups >= 1 && experts % route_groups == 0,
             "route groups must divide the {} experts into groups of the same size, got {}", experts, route_groups);
  PM_REQUIRE(route_top_groups >= 0 && route_top_groups <= route_groups,
             "route top groups must be between 1 and the {} route groups (0: every group), got {}", route_groups,
             route_top_groups);
  PM_REQUIRE(!group_limited() || top_k <= route_top_groups * (experts / route_groups),
             "top-k {} is more than the {} experts of the {} best of {} route groups a token may choose from",
             top_k, route_top_groups * (experts / route_groups), route_top_groups, route_groups);
}

int64_t MoeShape::capacity() const { return expert_capacity(top_k, capacity_factor, tokens, experts); }

void MoeShape::check_degree(int degree, const std::string& what) const {
  PM_REQUIRE(degree >= 1, "{} must be at least 1, got {}", what, degree);
  const int64_t c = capacity();
  PM_REQUIRE(degree <= c,
             "{} {} is more than the capacity of {} slots per expert: use a degree of at most {}", what, degree, c, c);
}

std::string MoeShape::str() const {
  const std::string groups =
      group_limited() ? fmt::format(" groups {} of {}", route_top_groups, route_groups) : std::string();
  const std::string drops = drop_policy == DropPolicy::probs ? " drop-probs" : "";
  const std::string scale = routed_scale != 1.0 ? fmt::format(" scale {}", routed_scale) : std::string();
  return fmt::format("T={} M={} H={} E={} k={} f={} P={}{}{}{}{}{}{}{}{}{}{}", tokens, model_dim, hidden, experts, top_k,
                     capacity_factor, ranks, drops, normalize_gates || top_k == 1 ? "" : " raw-gates", scale,
                     balance_bias ? " bias" : "", router_score == RouterScore::sigmoid ? " sigmoid" : "", groups,
                     activation == Activation::swiglu ? " swiglu" : "", precision == Precision::bf16 ? " bf16" : "",
                     dedup_dispatch || top_k == 1 ? "" : " no-dedup", recompute_experts ? " recompute" : "");
}

RouterScore parse_router_score(const std::string& name, const std::string& what) {
  if (name == "softmax") return RouterScore::softmax;
  PM_REQUIRE(name == "sigmoid", "{} must be \"softmax\" or \"sigmoid\", got \"{}\"", what, name);
  return RouterScore::sigmoid;
}

DropPolicy parse_drop_policy(const std::string& name, const std::string& what) {
  if (name == "position") return DropPolicy::position;
  PM_REQUIRE(name == "probs", "{} must be \"position\" (the last choices in filling order) or \"probs\" (the smallest "
             "gate values), got \"{}\"", what, name);
  return DropPolicy::probs;
}

Activation parse_activation(const std::string& name, const std::string& what) {
  if (name == "gelu") return Activation::gelu;
  PM_REQUIRE(name == "swiglu", "{} must be \"gelu\" or \"swiglu\", got \"{}\"", what, name);
  return Activation::swiglu;
}

const char* activation_name(Activation a) { return a == Activation::swiglu ? "swiglu" : "gelu"; }

Precision parse_precision(const std::string& name, const std::string& what) {
  if (name == "fp32") return Precision::fp32;
  PM_REQUIRE(name == "bf16", "{} must be \"fp32\" or \"bf16\", got \"{}\"", what, name);
  return Precision::bf16;
}

const char* precision_name(Precision p) { return p == Precision::bf16 ? "bf16" : "fp32"; }

}  // namespace pm
