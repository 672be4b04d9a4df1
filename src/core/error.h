// One error type for the whole engine, and the check macros that raise it.
//
// The kind decides how the CLI ends a multi-rank run:
//   usage     bad input found the same way on every rank (flags, config, shapes): every rank stops
//             on its own and rank 0 prints the one line;
//   io, comm, internal   something one rank saw (a file, a peer, a bug): that rank prints and the
//             whole job is aborted so that no rank waits forever in a collective.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace pm {

enum class ErrorKind { usage, io, comm, internal };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
[[noreturn]] void throw_check_failed(const char* file, int line, const char* condition,
                                     const std::string& message);
}  // namespace detail

}  // namespace pm

// An internal invariant; the message names file:line and the condition.
#define PM_CHECK(cond, ...)                                                                  \
  do {                                                                                       \
    if (!(cond)) ::pm::detail::throw_check_failed(__FILE__, __LINE__, #cond,                 \
                                                  ::fmt::format(__VA_ARGS__));               \
  } while (0)

// Bad user input: a plain message meant for the user, raised identically on every rank.
#define PM_REQUIRE(cond, ...)                                                                \
  do {                                                                                       \
    if (!(cond)) throw ::pm::Error(::pm::ErrorKind::usage, ::fmt::format(__VA_ARGS__));      \
  } while (0)

// A file or directory that cannot be read or written.
#define PM_IO_CHECK(cond, ...)                                                               \
  do {                                                                                       \
    if (!(cond)) throw ::pm::Error(::pm::ErrorKind::io, ::fmt::format(__VA_ARGS__));         \
  } while (0)
