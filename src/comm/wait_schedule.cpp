#include "comm/wait_schedule.h"

#include <algorithm>
#include <cmath>

namespace pm {

double next_sleep_us(const WaitPolicy& p, double waited_s, double expected_s, int polls) {
  const double waited_us = waited_s * 1e6, expected_us = expected_s * 1e6;
  if (waited_us < p.spin_us) return 0;
  double sleep_us;
  if (polls < p.early_polls)
    sleep_us = p.min_sleep_us * std::ldexp(1.0, polls);
  else if (expected_us > 0 && waited_us < expected_us)
    sleep_us = p.approach_fraction * (expected_us - waited_us);
  else if (expected_us > 0)
    // overdue: the peer came late or the link is slower now; test on a fine grid that widens
    // the longer it is late
    sleep_us = std::max(p.overdue_fraction * expected_us, p.sleep_fraction * (waited_us - expected_us));
  else
    sleep_us = p.sleep_fraction * waited_us;
  return std::clamp(sleep_us, p.min_sleep_us, p.max_sleep_us);
}

void TransferModel::record(double bytes, double seconds) {
  if (bytes < kMinBytes || !(seconds > 0)) return;
  double per_byte = seconds / bytes;
  if (per_byte_.size() < kWindow) {
    per_byte_.push_back(per_byte);
  } else {
    per_byte_[next_] = per_byte;
    next_ = (next_ + 1) % kWindow;
  }
}

double TransferModel::predict_s(double bytes) const {
  if (bytes < kMinBytes || per_byte_.size() < kMinSamples) return 0;
  std::vector<double> sorted = per_byte_;
  auto quartile = sorted.begin() + sorted.size() / 4;
  std::nth_element(sorted.begin(), quartile, sorted.end());
  return *quartile * bytes;
}

}  // namespace pm
