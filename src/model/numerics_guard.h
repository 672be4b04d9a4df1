// Non-finite numbers (NaN, Inf) in a training step: found at the step where they appear, and
// named: which tensor, which layer, which rank. The trainer then stops or skips the step as
// `nan_policy` says; a skipped step leaves the weights and the optimizer state untouched.
#pragma once

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/parameter.h"

namespace pm {

// This rank's loss and gradients: "" when all are finite, else e.g. "loss nan; gradient
// blocks.3.moe.w1 has 12 non-finite of 4096 values (first at 17)" (the first tensor with any).
std::string non_finite_report(const std::vector<Parameter>& params, double loss);

// Agreed by every rank (one all-reduce of a flag): whether any rank's loss or gradients are not
// finite. grad_norm is the global norm (already the same on every rank).
bool step_not_finite(Communicator& comm, double loss, double grad_norm);

// Fault injection for tests: PIPEMOE_FAULT_NAN="STEP[:RANK]" puts a NaN into one gradient (an MoE
// expert's if there is one) on that rank (default 0) after the backward of step STEP (1-based).
void inject_nan_if_asked(std::vector<Parameter>& params, int64_t step, int rank);

}  // namespace pm
