// What every MoE strategy's schedule is built with: a builder that adds a pass's tasks, each with
// its work (predicted, then the real rows'), binding each task's step only when there is work to
// do (planning binds nothing), and the work of the expert FFN tasks.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "moe/ep_graph.h"
#include "moe/moe_shape.h"
#include "sched/task_graph.h"

namespace pm {

// Adds a pass's tasks to a graph, each with the next of the pass's works, and keeps their ids.
struct PassBuilder {
  TaskGraph& graph;
  std::vector<TaskWork> work;  // in the order the tasks are added
  PassTasks tasks;
  int operator()(std::string name, Lane lane, const char* cost, int chunk, std::vector<int> deps,
                 std::function<void()> run) {
    const std::size_t next = tasks.ids.size();
    PM_CHECK(next < work.size(), "more tasks than works for the pass");
    int id = graph.add({std::move(name), lane, cost, chunk, work[next], std::move(deps), std::move(run)});
    tasks.ids.push_back(id);
    return id;
  }
};

// Binds a step, or nothing when planning.
template <typename Fn>
std::function<void()> bind_step(bool real, Fn fn) {
  return real ? std::function<void()>(fn) : std::function<void()>([] {});
}

// "name[chunk]"
std::string indexed(const char* name, int chunk);
std::vector<int> plus(std::vector<int> a, const std::vector<int>& b);

// Replaces the works of a pass's tasks (in the order they were added) by `works`.
void set_work(TaskGraph& graph, const PassTasks& tasks, const std::vector<TaskWork>& works);

// The bytes a weight-packing pass moves: local experts' W1 and W2, read and written.
double weight_pack_bytes(const MoeShape& s);
// Expert FFN work on rows: a pair of GEMMs (the forward's two, or the backward's input or weight
// gradients) is the forward's flops per row, plus `copies` copies of the rows.
TaskWork ffn_work(int64_t rows, const MoeShape& s, double gemms_per_expert, double copies);
// The input gradients' work on rows: their pair of GEMMs and copies; with recompute_experts also the
// first GEMM and the activation made again (its flops, its call per expert, the values it writes).
TaskWork dgrad_work(int64_t rows, const MoeShape& s, double copies);

}  // namespace pm
