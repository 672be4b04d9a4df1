// JSON read from outside (configuration files, --set values, checkpoint state, tokenizers,
// profiles, safetensors headers): bounded before it is parsed, and shown briefly in messages.
//
// nlohmann's parser keeps its own stack, but dumping or walking a value recurses: a value nested
// 100,000 deep overflows the stack while an error message prints it. So text nested deeper than
// kMaxJsonDepth, or longer than the caller's limit, is refused before parsing; messages show a
// value with brief(), which never prints more than a line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace pm {

inline constexpr int kMaxJsonDepth = 64;

// Parses `text` read from `source`; throws a usage Error "<source> <what>: <why>" (what: e.g.
// "is not valid JSON") when it is too long, nested too deep or not JSON.
nlohmann::json parse_json_input(const std::string& text, const std::string& source, const char* what = "is not valid JSON",
                                std::size_t max_bytes = std::size_t{64} << 20);

// The deepest nesting of arrays and objects in JSON text (strings skipped).
int json_depth(const std::string& text);

// An integer read from outside: a JSON integer (never a float: converting one out of range is
// undefined behaviour) from lo to hi; else a usage Error "<what> must be an integer from lo to hi".
int64_t json_int(const nlohmann::json& value, int64_t lo, int64_t hi, const std::string& what);

// A value for an error message: scalars as JSON, cut to ~60 characters; "an object of N keys",
// "an array of N values" otherwise.
std::string brief(const nlohmann::json& value);

}  // namespace pm
