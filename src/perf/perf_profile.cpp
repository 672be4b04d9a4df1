#include "perf/perf_profile.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "comm/communicator.h"
#include "core/error.h"
#include "core/json_input.h"
#include "core/log.h"
#include "kernels/backend.h"

namespace pm {
namespace {

nlohmann::json self_check_json(const std::vector<PerfProfile::CheckedPass>& passes) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& p : passes)
    out.push_back({{"shape", p.shape}, {"degree", p.degree}, {"forward", p.forward}, {"measured_s", p.measured_s},
                   {"predicted_s", p.predicted_s}});
  return out;
}

nlohmann::json interference_json(const Interference& f) {
  return {{"compute", f.compute}, {"comm", f.comm}, {"handoff_s", f.handoff_s}, {"comm_task_s", f.comm_task_s}};
}

Interference interference_from_json(const nlohmann::json& j, const std::string& source) {
  Interference f;
  f.compute = j.at("compute").get<double>();
  f.comm = j.at("comm").get<double>();
  f.handoff_s = j.value("handoff_s", 0.0);
  f.comm_task_s = j.value("comm_task_s", 0.0);  // profiles before the refit: none
  PM_REQUIRE(f.handoff_s >= 0, "{}: negative hand-off latency", source);
  PM_REQUIRE(f.comm_task_s >= 0, "{}: negative per-task communication cost", source);
  PM_REQUIRE(f.compute >= 1 && f.comm >= 1, "{}: interference factors below 1", source);
  return f;
}

constexpr const char* kFormat = "pipemoe-profile";
constexpr int kVersion = 1;

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

}  // namespace

std::string ClusterInfo::summary() const {
  return fmt::format("{} ranks on {} host(s), {} thread(s) each, {}, network: {}", world_size, hosts, threads,
                     cpu_model, network);
}

std::string ClusterInfo::mismatch(const ClusterInfo& here) const {
  std::vector<std::string> diffs;
  if (world_size != here.world_size) diffs.push_back(fmt::format("{} ranks, not {}", world_size, here.world_size));
  if (hosts != here.hosts) diffs.push_back(fmt::format("{} hosts, not {}", hosts, here.hosts));
  if (threads != here.threads) diffs.push_back(fmt::format("{} threads per rank, not {}", threads, here.threads));
  if (cpu_model != here.cpu_model) diffs.push_back(fmt::format("CPU '{}', not '{}'", cpu_model, here.cpu_model));
  if (network != here.network) diffs.push_back(fmt::format("network '{}', not '{}'", network, here.network));
  std::string out;
  for (const auto& d : diffs) out += (out.empty() ? "" : "; ") + d;
  return out;
}

ClusterInfo describe_cluster(Communicator& comm, const Backend& backend) {
  ClusterInfo c;
  c.world_size = comm.size();
  c.threads = backend.threads();
  c.cpu_model = cpu_model_name();
  std::vector<std::string> names = comm.gather_strings(comm.host(), 0);
  int64_t hosts = static_cast<int64_t>(std::set<std::string>(names.begin(), names.end()).size());
  comm.broadcast(&hosts, 1, DType::i64, 0);
  c.hosts = static_cast<int>(hosts);
  if (const char* net = std::getenv("PIPEMOE_NETWORK"))
    c.network = net;
  else if (comm.backend() == "in-process")
    c.network = "ranks as threads";  // memory copies: a profile of it fits no real network
  else
    c.network = c.hosts == 1 ? "shared memory" : "unknown";
  // every rank takes rank 0's view (a CPU model could differ in a mixed cluster)
  c.cpu_model = comm.broadcast_string(c.cpu_model, 0);
  c.network = comm.broadcast_string(c.network, 0);
  return c;
}

std::array<double, kNumFeatures> task_features(const TaskWork& w) { return {1.0, w.calls, w.flops, w.bytes}; }

double CostModel::predict(const TaskWork& work) const {
  auto f = task_features(work);
  double t = 0;
  for (int i = 0; i < kNumFeatures; ++i) t += coef[i] * f[i];
  return t;
}

double PerfProfile::predict(const Task& task) const {
  auto it = models.find(task.cost);
  PM_REQUIRE(it != models.end() && it->second.fitted,
             "the profile has no model for {} tasks: take a new profile with `pipemoe profile`", task.cost);
  return it->second.predict(task.work);
}

std::vector<std::string> PerfProfile::trust_problems() const {
  std::vector<std::string> out;
  for (const auto& [cost, m] : models)
    if (m.fitted && m.samples >= 4 && m.median_rel_err > kMaxFitError)
      out.push_back(fmt::format("the {} model misses its own samples by {:.0f}% (median; r2 {:.2f})", cost,
                                m.median_rel_err * 100, m.r2));
  if (self_check_median_error > kMaxSelfCheckError)
    out.push_back(fmt::format("overlapped layer passes differ from their simulation by {:.0f}% (median)",
                              self_check_median_error * 100));
  return out;
}

std::string PerfProfile::to_json() const {
  nlohmann::json models_json = nlohmann::json::object();
  for (const auto& [cost, m] : models) {
    if (!m.fitted) continue;
    models_json[cost] = {
        {"seconds", {{"fixed", m.coef[0]}, {"per_call", m.coef[1]}, {"per_flop", m.coef[2]}, {"per_byte", m.coef[3]}}},
        {"samples", m.samples},
        {"r2", m.r2},
        {"median_rel_err", m.median_rel_err}};
  }
  nlohmann::json j = {
      {"format", kFormat},
      {"version", kVersion},
      {"created", created},
      {"dtype", dtype},
      {"bf16_path", bf16_path},
      {"cluster",
       {{"world_size", cluster.world_size}, {"hosts", cluster.hosts}, {"threads", cluster.threads},
        {"cpu_model", cluster.cpu_model}, {"network", cluster.network}}},
      {"interference", interference_json(interference)},
      {"interference_measured", interference_json(interference_measured)},
      {"self_check_median_error", self_check_median_error},
      {"self_check", self_check_json(self_check)},
      {"trusted", trust_problems().empty()},
      {"trust_problems", trust_problems()},
      {"models", models_json}};
  return j.dump(2);
}

PerfProfile PerfProfile::from_json(const std::string& text, const std::string& source) {
  nlohmann::json j = parse_json_input(text, source, "is not a valid profile: not JSON", std::size_t{16} << 20);
  PerfProfile p;
  try {
    PM_REQUIRE(j.is_object() && j.value("format", "") == kFormat,
               "{} is not a pipemoe profile (no \"format\": \"{}\")", source, kFormat);
    const int64_t version = json_int(j.at("version"), 0, INT32_MAX, source + ": version");
    PM_REQUIRE(version == kVersion, "{} is a profile of format version {}, this build reads {}", source, version,
               kVersion);
    p.created = j.value("created", "");
    p.dtype = j.value("dtype", "fp32");  // older profiles: fp32, all there was
    p.bf16_path = j.value("bf16_path", "");
    PM_REQUIRE(p.dtype == "fp32" || p.dtype == "bf16", "{}: dtype must be \"fp32\" or \"bf16\", got \"{}\"", source,
               p.dtype);
    p.self_check_median_error = j.value("self_check_median_error", 0.0);
    if (j.contains("self_check"))
      for (const auto& e : j.at("self_check"))
        p.self_check.push_back({e.at("shape").get<int>(), e.at("degree").get<int>(), e.at("forward").get<bool>(),
                                e.at("measured_s").get<double>(), e.at("predicted_s").get<double>()});
    const auto& c = j.at("cluster");
    p.cluster.world_size = static_cast<int>(json_int(c.at("world_size"), 1, 1 << 20, source + ": cluster world_size"));
    p.cluster.hosts = static_cast<int>(json_int(c.at("hosts"), 1, 1 << 20, source + ": cluster hosts"));
    p.cluster.threads = static_cast<int>(json_int(c.at("threads"), 0, 1 << 16, source + ": cluster threads"));
    p.cluster.cpu_model = c.at("cpu_model").get<std::string>();
    p.cluster.network = c.at("network").get<std::string>();
    p.interference = interference_from_json(j.at("interference"), source);
    // older profiles have no refit: what they measured is what they planned with
    p.interference_measured = j.contains("interference_measured")
                                  ? interference_from_json(j.at("interference_measured"), source)
                                  : p.interference;
    for (auto& [name, m] : j.at("models").items()) {
      PM_REQUIRE(!name.empty() && name.size() <= 64, "{}: a cost class name must be 1 to 64 characters", source);
      CostModel& km = p.models[name];
      const auto& s = m.at("seconds");
      km.coef = {s.at("fixed").get<double>(), s.at("per_call").get<double>(), s.at("per_flop").get<double>(),
                 s.at("per_byte").get<double>()};
      for (double v : km.coef) PM_REQUIRE(v >= 0 && std::isfinite(v), "{}: negative or infinite cost for {}", source, name);
      km.samples = m.value("samples", 0);
      km.r2 = m.value("r2", 0.0);
      km.median_rel_err = m.value("median_rel_err", 0.0);
      km.fitted = true;
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{} is not a valid profile: {}", source, e.what()));
  }
  return p;
}

void PerfProfile::save(const std::string& path) const {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    PM_IO_CHECK(out.good(), "cannot write profile {}", tmp);
    out << to_json() << "\n";
    out.close();
    PM_IO_CHECK(!out.fail(), "writing profile {} failed", tmp);
  }
  PM_IO_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename {} to {}", tmp, path);
}

namespace {

// The file's text, or a usage error naming it.
std::string read_profile_text(const std::string& path) {
  std::ifstream in(path);
  PM_REQUIRE(in.good(), "cannot read profile {}: no such file (take one with `pipemoe profile --out {}`)", path, path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

PerfProfile PerfProfile::load(const std::string& path) { return from_json(read_profile_text(path), path); }

PerfProfile load_profile_for(Communicator& comm, const std::string& path, const ClusterInfo& here) {
  std::string text, error;
  if (comm.rank() == 0) {
    try {
      text = read_profile_text(path);
    } catch (const Error& e) {
      error = e.what();
    }
  }
  error = comm.broadcast_string(error, 0);
  PM_REQUIRE(error.empty(), "{}", error);
  PerfProfile p = PerfProfile::from_json(comm.broadcast_string(text, 0), path);
  std::string diff = p.cluster.mismatch(here);
  PM_REQUIRE(diff.empty(), "profile {} was taken on another cluster ({}): take one here with `pipemoe profile`",
             path, diff);
  warn_if_untrusted(p, path);
  return p;
}

void warn_if_other_dtype(const PerfProfile& profile, const std::string& path, const std::string& dtype,
                         const std::string& bf16_path) {
  if (profile.dtype == dtype && dtype == "bf16" && !profile.bf16_path.empty() && profile.bf16_path != bf16_path) {
    log::info("warning: profile {} timed bf16 GEMMs on {} and this run's run on {}: its GEMM costs may be off by "
              "several times; take one the way this run goes (`pipemoe --bf16-order ... profile --dtype bf16`)",
              path, profile.bf16_path, bf16_path);
    return;
  }
  if (profile.dtype == dtype) return;
  log::info("warning: profile {} timed {} layers and this one runs {}: its GEMM costs may be off (bf16 GEMMs run "
            "faster where the CPU has AVX512_BF16); take one with `pipemoe profile --dtype {}`",
            path, profile.dtype, dtype, dtype);
}

void warn_if_untrusted(const PerfProfile& profile, const std::string& path) {
  std::vector<std::string> problems = profile.trust_problems();
  if (problems.empty()) return;
  log::info("warning: profile {} is not to be trusted, its predictions and the degrees planned from them may be far off:",
            path);
  for (const std::string& p : problems) log::info("  - {}", p);
  log::info("  take it again on a quiet machine (nothing else running) with more passes: pipemoe profile --iters 5");
}

}  // namespace pm
