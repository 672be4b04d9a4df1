// What every fuzz target promises: on any bytes the parser returns or throws pm::Error (a clear
// message for the user); anything else (another exception, a crash, a sanitizer report, a
// timeout) is a bug that libFuzzer reports with the input that caused it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"

#define PM_FUZZ_TARGET(body)                                                          \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {          \
    const std::string input(reinterpret_cast<const char*>(data), size);              \
    try {                                                                             \
      body;                                                                           \
    } catch (const pm::Error&) {                                                      \
    }                                                                                 \
    return 0;                                                                         \
  }
