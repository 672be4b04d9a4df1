// Medians of measurements taken in interleaved rounds, with the rounds' drift taken out.
//
// This host's speed drifts by 10% and more over seconds (shared virtual machines), while the
// passes of one round (one per pipeline degree, back to back) see nearly the same speed. So each
// value is divided by its round's level (the median over the round's values), the median over
// rounds of those ratios is taken per key, and scaled back by the median level: differences
// between keys keep the precision of a round, not the host's drift. Every key must have one value
// per round.
#pragma once

#include <map>
#include <vector>

namespace pm {

struct RoundMedians {
  std::map<int, double> median;  // per key, drift taken out
  std::map<int, double> spread;  // per key, (max - min) / median of its ratios: the noise left
};

// A round's level: the median of its values (robust to one slow pass among many keys), or their
// mean: with few keys the median IS one key's value, whose ratio is then exactly 1, and two keys
// that each sit in the middle of some rounds come out exactly tied.
enum class RoundLevel { median, mean };

RoundMedians round_medians(const std::map<int, std::vector<double>>& per_key, RoundLevel how = RoundLevel::median);

}  // namespace pm
