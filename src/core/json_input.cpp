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

std::string brief(const nlohmann::json& value) {
  if (value.is_object()) return fmt::format("an object of {} keys", value.size());
  if (value.is_array()) return fmt::format("an array of {} values", value.size());
  std::string s = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

}  // namespace pm
