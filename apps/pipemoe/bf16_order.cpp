// The order bf16 GEMMs sum in (kernels/cpu/gemm.h, Bf16Order), from --bf16-order, a training
// configuration's 'bf16_order' or a checkpoint's: set once, every rank alike, before a model exists.
#include "apps/pipemoe/command.h"
#include "core/error.h"
#include "kernels/cpu/gemm.h"

namespace pm::cli {

void apply_bf16_order(const Context& ctx, const std::string& order) {
  if (order.empty()) return;  // pipemoe's --bf16-order stands
  PM_REQUIRE(order == "dot" || order == "amx" || order == "auto",  // (the flag's values are checked as it is read)
             "configuration: 'bf16_order' must be \"dot\", \"amx\" or \"auto\", got '{}'", order);
  const bool cpu = ctx.backend.device() == Device::cpu;
  PM_REQUIRE(order != "amx" || cpu, "bf16 order amx runs on the CPU backend only (the CUDA kernels sum in the dot order)");
  bool amx = order == "amx";
  if (order == "auto") {
    // amx where every rank runs it on AMX's tiles; one rank without them (or a GPU) makes it dot
    // everywhere, so that the ranks agree on the bits
    const double everywhere = ctx.comm.allreduce_scalar(cpu && amx_runs_here() ? 1.0 : 0.0, ReduceOp::min);
    amx = everywhere > 0.5;
  }
  set_bf16_order(amx ? Bf16Order::amx : Bf16Order::dot);
}

}  // namespace pm::cli
