// The lists of an expert's rows (kernels/backend.h): ExpertRows::check, the contract of
// expert_weight_grads for every backend, and RowList.
#include "core/error.h"
#include "kernels/backend.h"

namespace pm {

void ExpertRows::check(Precision precision) const {
  const size_t u_rows = u.size() + u_bf16.size(), act_rows = act.size() + act_bf16.size();
  PM_CHECK(u_rows == rows() && act_rows == rows() && dhpre.size() == rows() && (u.empty() || u_bf16.empty()) &&
               (act.empty() || act_bf16.empty()) && (dy.empty() || dy_bf16.empty()),
           "expert rows disagree: {} u, {} act, {} dhpre, {} dy", u_rows, act_rows, dhpre.size(), rows());
  PM_CHECK((u_bf16.empty() && act_bf16.empty() && dy_bf16.empty()) || precision == Precision::bf16,
           "bf16 rows of an expert's input, activation or output gradient need a bf16 expert");
  PM_CHECK(dy_scale.empty() || dy_scale.size() == dy.size(), "scaled output gradients: {} scales for {} float rows",
           dy_scale.size(), dy.size());
}

RowList::RowList(RowsIn first, int64_t rows, int64_t width) {
  resize(rows, first.bf16 ? Precision::bf16 : Precision::fp32);
  set_runs(first, width, {{0, 0, rows}});
}

void RowList::resize(int64_t rows, Precision precision) {
  is_bf16_ = precision == Precision::bf16;
  f32_.assign(is_bf16_ ? 0 : rows, nullptr);
  bf16_.assign(is_bf16_ ? rows : 0, nullptr);
}

void RowList::set(int64_t i, RowsIn row) {
  PM_CHECK((row.bf16 != nullptr) == is_bf16_, "a {} row in a list of {} rows", row.bf16 ? "bf16" : "float",
           is_bf16_ ? "bf16" : "float");
  if (is_bf16_)
    bf16_.at(i) = row.bf16;
  else
    f32_.at(i) = row.f32;
}

void RowList::set_runs(RowsIn src, int64_t width, const std::vector<RowRun>& runs) {
  for (const RowRun& run : runs)
    for (int64_t r = 0; r < run.rows; ++r) {
      const int64_t at = (run.src_row + r) * width;
      set(run.dst_row + r, src.bf16 ? RowsIn(src.bf16 + at) : RowsIn(src.f32 + at));
    }
}

RowPointers RowList::from(int64_t i) const {
  if (is_bf16_) return bf16_.data() + i;
  return f32_.data() + i;
}

RowList RowList::picked(const std::vector<int64_t>& positions) const {
  RowList list;
  list.is_bf16_ = is_bf16_;
  add_rows(positions, list.f32_, list.bf16_);
  return list;
}

void RowList::add_rows(const std::vector<int64_t>& positions, std::vector<const float*>& f32,
                       std::vector<const uint16_t*>& bf16) const {
  for (int64_t p : positions) {
    if (is_bf16_)
      bf16.push_back(bf16_.at(p));
    else
      f32.push_back(f32_.at(p));
  }
}

int64_t RowList::bytes() const {
  return static_cast<int64_t>(f32_.capacity() * sizeof(const float*) + bf16_.capacity() * sizeof(const uint16_t*));
}

void RowList::release() {
  std::vector<const float*>().swap(f32_);
  std::vector<const uint16_t*>().swap(bf16_);
}

}  // namespace pm
