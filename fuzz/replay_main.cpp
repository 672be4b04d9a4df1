// Without libFuzzer (the ordinary build, the test suite), a fuzz target is run two ways:
//
//   replay_<t> PATH...                       every file of the folders or files given (its seed
//                                            corpus and the inputs that once crashed it), so each
//                                            stays a regression test;
//   replay_<t> --mutate SECONDS [--seed N] PATH...
//                                            a short random-mutation fuzz run from those inputs
//                                            (bit flips, byte edits, cut and repeated ranges,
//                                            boundary numbers, splices of two inputs): the test
//                                            suite's short fuzz run, in every build, also under
//                                            scripts/sanitize. scripts/fuzz runs libFuzzer for the
//                                            long, coverage-guided runs.
//
// A crash during --mutate writes the input that caused it to fuzz-crash-<pid>.bin in the working
// folder (from the signal handler) and says so; copy it to fuzz/crashes/<t>/ to keep it as a test.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

namespace fs = std::filesystem;

std::vector<std::string> read_inputs(const std::vector<std::string>& paths, size_t* file_count) {
  std::vector<fs::path> files;
  for (const std::string& p : paths) {
    if (fs::is_directory(p)) {
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) files.push_back(e.path());
    } else if (fs::exists(p)) {
      files.push_back(p);
    }
  }
  std::vector<std::string> inputs;
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    inputs.emplace_back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  *file_count = files.size();
  return inputs;
}

void run_one(const std::string& bytes) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

// The input being run, for the crash handler (which may only call async-signal-safe functions).
const std::string* g_current = nullptr;

extern "C" void save_crashing_input(int sig) {
  char name[64];
  std::snprintf(name, sizeof name, "fuzz-crash-%d.bin", static_cast<int>(getpid()));
  if (g_current != nullptr) {
    const int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ssize_t ignored = write(fd, g_current->data(), g_current->size());
      (void)ignored;
      close(fd);
    }
    const char msg[] = "fuzz: crashed; the input is in ";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    ignored = write(2, name, std::strlen(name));
    ignored = write(2, "\n", 1);
    (void)ignored;
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// Numbers and tokens at the edges parsers get wrong: signs, overflow, exponents, nesting.
const char* const kInteresting[] = {"0",  "-1", "-0", "1e9", "1e308", "4294967296", "9223372036854775808",
                                    "NaN", "null", "true", "\"", "[", "{", "}", "]", ":", ",", "\\u0000",
                                    "\xff\xff\xff\xff", "\x00\x00\x00\x00", "-2147483649", "1.5"};

std::string mutate(std::string s, const std::vector<std::string>& inputs, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 8) {
      case 0:  // flip one bit
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:  // set one byte
        if (!s.empty()) s[pick(s.size())] = static_cast<char>(rng());
        break;
      case 2:  // insert random bytes
        s.insert(pick(s.size() + 1), std::string(1 + pick(8), static_cast<char>(rng())));
        break;
      case 3: {  // cut a range
        if (s.empty()) break;
        const size_t at = pick(s.size());
        s.erase(at, 1 + pick(std::min<size_t>(64, s.size() - at)));
        break;
      }
      case 4: {  // repeat a range
        if (s.empty() || s.size() > 65536) break;
        const size_t at = pick(s.size());
        const std::string part = s.substr(at, 1 + pick(64));
        s.insert(pick(s.size() + 1), part);
        break;
      }
      case 5: {  // a boundary token over a digit run or at a random place
        const std::string tok = kInteresting[pick(std::size(kInteresting))];
        const size_t at = pick(s.size() + 1);
        size_t end = at;
        while (end < s.size() && (std::isdigit(static_cast<unsigned char>(s[end])) || s[end] == '.')) ++end;
        s.replace(at, end - at, tok);
        break;
      }
      case 6: {  // splice with another input
        const std::string& other = inputs[pick(inputs.size())];
        s = s.substr(0, pick(s.size() + 1)) + other.substr(pick(other.size() + 1));
        break;
      }
      case 7:  // truncate
        s.resize(pick(s.size() + 1));
        break;
    }
  }
  return s;
}

int mutate_for(double seconds, uint64_t seed, const std::vector<std::string>& inputs) {
  std::signal(SIGSEGV, save_crashing_input);
  std::signal(SIGABRT, save_crashing_input);
  std::signal(SIGFPE, save_crashing_input);
  std::signal(SIGBUS, save_crashing_input);
  std::signal(SIGILL, save_crashing_input);
  std::mt19937_64 rng(seed);
  const auto start = std::chrono::steady_clock::now();
  const auto limit = start + std::chrono::duration<double>(seconds);
  int64_t executions = 0;
  std::string current;
  g_current = &current;
  while (std::chrono::steady_clock::now() < limit) {
    // Chains of mutations reach deeper than single edits of a seed: keep mutating the same input
    // for a while, then start again from a seed.
    if (executions % 16 == 0) current = inputs[rng() % inputs.size()];
    current = mutate(std::move(current), inputs, rng);
    if (current.size() > (1u << 20)) current.resize(1u << 20);
    run_one(current);
    ++executions;
  }
  g_current = nullptr;
  std::printf("mutated and ran %lld inputs in %.0f s from %zu seeds (seed %llu), no crash\n",
              static_cast<long long>(executions), seconds, inputs.size(), static_cast<unsigned long long>(seed));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  double mutate_seconds = 0;
  uint64_t seed = static_cast<uint64_t>(std::random_device{}());
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mutate" && i + 1 < argc) {
      mutate_seconds = std::atof(argv[++i]);
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      paths.push_back(arg);
    }
  }
  size_t file_count = 0;
  const std::vector<std::string> inputs = read_inputs(paths, &file_count);
  if (inputs.empty()) {  // no input at all: the corpus is missing
    std::fprintf(stderr, "fuzz: no input files in the paths given\n");
    return 1;
  }
  if (mutate_seconds > 0) return mutate_for(mutate_seconds, seed, inputs);
  for (const std::string& bytes : inputs) run_one(bytes);
  std::printf("replayed %zu inputs\n", file_count);
  return 0;
}
