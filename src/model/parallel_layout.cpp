#include "model/parallel_layout.h"

#include <fmt/format.h>

#include "core/error.h"

namespace pm {

ParallelLayout ParallelLayout::make(int world, int tp, int pp, int layers, std::vector<int> starts) {
  PM_REQUIRE(tp >= 1 && pp >= 1, "the layout needs tp and pp of at least 1, got tp {} pp {}", tp, pp);
  PM_REQUIRE(world % (tp * pp) == 0, "the layout tp {} x pp {} does not divide the {} ranks", tp, pp, world);
  PM_REQUIRE(pp <= layers, "pp {}: more pipeline stages than the model's {} blocks", pp, layers);
  ParallelLayout l;
  l.world = world, l.tp = tp, l.pp = pp, l.dp = world / (tp * pp), l.layers = layers;
  if (starts.empty())
    for (int s = 0; s <= pp; ++s) starts.push_back(static_cast<int>(static_cast<long>(s) * layers / pp));
  PM_CHECK(static_cast<int>(starts.size()) == pp + 1 && starts.front() == 0 && starts.back() == layers,
           "stage starts for {} stages of {} blocks", pp, layers);
  for (int s = 0; s < pp; ++s) PM_CHECK(starts[s] < starts[s + 1], "stage {} holds no block", s);
  l.starts = std::move(starts);
  return l;
}

std::vector<std::string> ParallelLayout::table() const {
  std::vector<std::string> lines;
  lines.push_back(fmt::format("{:>6} {:>4} {:>4} {:>4}  {}", "rank", "tp", "dp", "pp", "holds"));
  for (int r = 0; r < world; ++r) {
    const int s = stage(r), first = first_block(s), end = end_block(s);
    std::string holds = first + 1 == end ? fmt::format("block {}", first) : fmt::format("blocks {}-{}", first, end - 1);
    if (s == 0) holds = "embeddings, " + holds;
    if (s == pp - 1) holds += ", final norm and head (tied embedding)";
    lines.push_back(fmt::format("{:>6} {:>4} {:>4} {:>4}  {}", r, tp_rank(r), dp_rank(r), s, holds));
  }
  return lines;
}

ParallelGroups ParallelGroups::make(Communicator& world, const ParallelLayout& layout) {
  PM_CHECK(world.size() == layout.world, "layout of {} ranks on {}", layout.world, world.size());
  const int r = world.rank();
  ParallelGroups g;
  g.stage = world.split(layout.stage(r), r);
  // one pipeline per (tp_rank, dp_rank): ordered by stage
  g.pipeline = world.split(layout.tp_rank(r) + layout.tp * layout.dp_rank(r), layout.stage(r));
  // every rank calls split; the ranks between the ends pass a color of their own and drop theirs
  const int s = layout.stage(r);
  const bool end = layout.pp > 1 && (s == 0 || s == layout.pp - 1);
  const int pipelines = layout.tp * layout.dp;
  std::unique_ptr<Communicator> ends =
      world.split(end ? layout.tp_rank(r) + layout.tp * layout.dp_rank(r) : pipelines + r, r);
  if (end) g.embedding = std::move(ends);
  return g;
}

}  // namespace pm
