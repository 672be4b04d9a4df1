#include "perf/serial_samples.h"

#include "comm/communicator.h"

namespace pm {

std::vector<TaskSample> serial_task_samples(Communicator& comm, const TaskGraph& graph, const ExecutorStats& stats) {
  const int n = graph.size();
  std::vector<double> seconds(n, 0.0), comm_seconds(n, 0.0), work(3 * n, 0.0), bytes(n, 0.0);
  for (const TaskRecord& r : stats.records) seconds[r.task] = comm_seconds[r.task] = r.end_s - r.start_s;
  for (int id = 0; id < n; ++id) {
    const TaskWork& w = graph.tasks()[id].work;
    work[3 * id] = w.calls, work[3 * id + 1] = w.flops, work[3 * id + 2] = w.bytes;
    bytes[id] = w.bytes;
  }
  comm.allreduce(seconds.data(), seconds.data(), n, DType::f64, ReduceOp::max);
  comm.allreduce(comm_seconds.data(), comm_seconds.data(), n, DType::f64, ReduceOp::min);
  comm.allreduce(work.data(), work.data(), 3 * n, DType::f64, ReduceOp::sum);
  comm.allreduce(bytes.data(), bytes.data(), n, DType::f64, ReduceOp::max);
  std::vector<TaskSample> out;
  for (int id = 0; id < n; ++id) {
    const Task& t = graph.tasks()[id];
    TaskSample s{t.cost, t.lane, t.work, seconds[id]};
    if (t.lane == lanes::comm) {
      s.work.bytes = bytes[id];
      s.seconds = comm_seconds[id];
    } else {
      s.work = TaskWork{work[3 * id] / comm.size(), work[3 * id + 1] / comm.size(), work[3 * id + 2] / comm.size()};
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace pm
