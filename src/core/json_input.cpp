#include "core/json_input.h"

#include <algorithm>

#include "core/error.h"

namespace pm {

int json_depth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    if (c == '[' || c == '{') deepest = std::max(deepest, ++depth);
    if (c == ']' || c == '}') --depth;
  }
  return deepest;
}

nlohmann::json parse_json_input(const std::string& text, const std::string& source, const char* what,
                                std::size_t max_bytes) {
  PM_REQUIRE(text.size() <= max_bytes, "{} {}: {} bytes, more than the {} this input may have", source, what,
             text.size(), max_bytes);
  const int depth = json_depth(text);
  PM_REQUIRE(depth <= kMaxJsonDepth, "{} {}: nested {} deep (at most {})", source, what, depth, kMaxJsonDepth);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    std::string why = e.what();
    if (why.size() > 160) why = why.substr(0, 160) + "...";
    throw Error(ErrorKind::usage, fmt::format("{} {}: {}", source, what, why));
  }
}

int64_t json_int(const nlohmann::json& value, int64_t lo, int64_t hi, const std::string& what) {
  bool ok = false;
  int64_t v = 0;
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    ok = hi >= 0 && u <= static_cast<uint64_t>(hi);
    v = ok ? static_cast<int64_t>(u) : 0;
    ok = ok && v >= lo;
  } else if (value.is_number_integer()) {
    v = value.get<int64_t>();
    ok = v >= lo && v <= hi;
  }
  PM_REQUIRE(ok, "{} must be an integer from {} to {}, got {}", what, lo, hi, brief(value));
  return v;
}

std::string brief(const nlohmann::json& value) {
  if (value.is_object()) return fmt::format("an object of {} keys", value.size());
  if (value.is_array()) return fmt::format("an array of {} values", value.size());
  std::string s = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

}  // namespace pm
