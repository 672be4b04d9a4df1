#include "core/error.h"

namespace pm::detail {

void throw_check_failed(const char* file, int line, const char* condition,
                        const std::string& message) {
  throw Error(ErrorKind::internal,
              fmt::format("{}:{}: check failed: {}: {}", file, line, condition, message));
}

}  // namespace pm::detail
