#include "model/train_log.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/clock.h"
#include "core/log.h"

namespace pm {
namespace fs = std::filesystem;

namespace {

std::string duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60)
                   : fmt::format("{}:{:02d}", s / 60, s % 60);
}

// The shortest text that reads back as the same double: losses compare bit for bit across runs.
std::string exact(double v) { return fmt::format("{}", v); }

// A run killed after its last checkpoint logged steps that the resumed run takes again: the rows
// past the checkpoint's step go, so that every step has one row (rewritten beside, then renamed).
void keep_rows_up_to(const std::string& path, int64_t step) {
  std::ifstream in(path);
  std::string line, kept;
  bool header = true;
  while (std::getline(in, line)) {
    if (header || std::strtoll(line.c_str(), nullptr, 10) <= step) kept += line + "\n";
    header = false;
  }
  in.close();
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp, std::ios::trunc) << kept;
  std::error_code ec;
  fs::rename(tmp, path, ec);
}

}  // namespace

TrainLog::TrainLog(const TrainConfig& c, int rank, int64_t tokens_per_step, int moe_layers, int64_t first_step,
                   int64_t last_step, const std::string& csv_path, bool resuming)
    : c_(c),
      rank_(rank),
      tokens_per_step_(tokens_per_step),
      moe_layers_(moe_layers),
      first_step_(first_step),
      last_step_(last_step),
      csv_path_(csv_path),
      started_s_(now_s()) {
  if (rank_ != 0) return;
  std::error_code ec;
  if (fs::path(csv_path).has_parent_path()) fs::create_directories(fs::path(csv_path).parent_path(), ec);
  const bool append = resuming && fs::exists(csv_path);
  if (append) keep_rows_up_to(csv_path, first_step);
  csv_.open(csv_path, append ? std::ios::app : std::ios::trunc);
  if (!csv_.good()) {
    open_error_ = fmt::format("cannot write the training log {}", csv_path);
    return;
  }
  if (append) return;
  csv_ << "step,lr,train_loss,aux_loss,val_loss,tokens_per_s,step_ms,compute_ms,exposed_comm_ms,grad_norm,dropped_share,"
          "comm_hidden_share,pipeline_wait_ms";
  for (int l = 0; l < moe_layers_; ++l)
    csv_ << ",moe" << l << "_load_max,moe" << l << "_load_mean,moe" << l << "_comm_hidden";
  csv_ << "\n";
}

std::string TrainLog::png_path() const {
  return !c_.plot.empty() ? c_.plot : fs::path(csv_path_).replace_extension(".png").string();
}

void TrainLog::record(const StepRecord& r, const std::string& moe_schedule, double eval_s, double val_bytes_per_token,
                      double unigram) {
  window_.push_back(r);
  if (r.val_loss) last_eval_s_ = eval_s;
  if (r.step % c_.log_every == 0 || r.step == last_step_) print_window(r, moe_schedule);
  if (r.val_loss)
    log::info("step {:5d} | validation loss {:.4f} nats/token (perplexity {:.1f}, {:.3f} bits/byte) | unigram entropy "
              "{:.4f} nats/token",
              r.step, *r.val_loss, std::exp(*r.val_loss), *r.val_loss / std::log(2.0) / val_bytes_per_token, unigram);
  if (rank_ != 0) return;
  csv_ << r.step << "," << exact(r.lr) << "," << exact(r.loss) << "," << exact(r.aux) << ","
       << (r.val_loss ? exact(*r.val_loss) : "") << "," << tokens_per_step_ / (r.step_ms / 1e3) << "," << r.step_ms
       << "," << r.step_ms - r.exposed_ms - r.pipeline_wait_ms << "," << r.exposed_ms << "," << exact(r.grad_norm) << ","
       << r.dropped_share << "," << r.comm_hidden_share << "," << r.pipeline_wait_ms;
  for (std::size_t l = 0; l < r.load_max.size(); ++l)
    csv_ << "," << r.load_max[l] << "," << r.load_mean[l] << ","
         << (l < r.block_hidden_share.size() ? r.block_hidden_share[l] : 0.0);
  csv_ << "\n";
  csv_.flush();
  // a long run can be watched: the PNG follows every evaluation (drawn in the background)
  if (r.val_loss && r.step != last_step_) plot(/*wait=*/false);
}

void TrainLog::print_window(const StepRecord& last, const std::string& moe_schedule) {
  const double n = static_cast<double>(window_.size());
  auto mean = [&](double StepRecord::*field) {
    double s = 0;
    for (const StepRecord& r : window_) s += r.*field;
    return s / n;
  };
  const double ms = mean(&StepRecord::step_ms), exposed = mean(&StepRecord::exposed_ms);
  last_window_loss_ = mean(&StepRecord::loss);
  double load = 0;  // the busiest expert over the mean, averaged over layers and steps
  int loads = 0;
  for (const StepRecord& r : window_)
    for (std::size_t l = 0; l < r.load_max.size(); ++l)
      if (r.load_mean[l] > 0) load += r.load_max[l] / r.load_mean[l], ++loads;
  const double elapsed = now_s() - started_s_;
  const int64_t left = last_step_ - last.step;
  const int64_t evals_left = left / c_.eval_every + (last_step_ % c_.eval_every != 0 && left > 0);
  const double eta = left * ms / 1e3 + evals_left * last_eval_s_;
  std::string moe = moe_layers_ == 0 ? ""
                                     : fmt::format(" | dropped {:.1f}% | expert load max/mean {:.2f} | a2a hidden {:.0f}% | "
                                                   "{}",
                                                   mean(&StepRecord::dropped_share) * 100, loads ? load / loads : 0.0,
                                                   mean(&StepRecord::comm_hidden_share) * 100, moe_schedule);
  const std::string z = c_.model.z_loss_coef > 0 ? fmt::format(" | z-loss {:.3f}", mean(&StepRecord::z_loss)) : "";
  // pipeline stages: the time every rank waited for its neighbours, against 1F1B's bubble
  const std::string wait =
      c_.pp > 1 ? fmt::format(" + pipeline wait {:.1f} ({:.0f}%, 1F1B bubble {:.0f}%)", mean(&StepRecord::pipeline_wait_ms),
                              100 * mean(&StepRecord::pipeline_wait_ms) / ms,
                              100.0 * (c_.pp - 1) / (c_.micro_batches + c_.pp - 1))
                : "";
  log::info("step {:5d}/{} | loss {:.4f} | aux {:.4f}{} | grad norm {:.3f} | lr {:.2e} | {:6.0f} tok/s | {:6.1f} ms/step: "
            "compute {:.1f} + exposed comm {:.1f}{}{} | {} elapsed, ETA {}",
            last.step, c_.max_steps, last_window_loss_, mean(&StepRecord::aux), z, mean(&StepRecord::grad_norm), last.lr,
            tokens_per_step_ / (ms / 1e3), ms, ms - exposed - mean(&StepRecord::pipeline_wait_ms), exposed, wait, moe,
            duration(elapsed), duration(eta));
  window_.clear();
}

void TrainLog::plot(bool wait) const {
  if (c_.plot == "none") return;  // asked for no PNG (many short runs, a machine without matplotlib)
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  fs::path script = exe.parent_path().parent_path() / "scripts" / "plot-loss";
  if (ec || !fs::exists(script)) {
    if (wait) log::info("loss curve: {} not found, no PNG drawn", script.string());
    return;
  }
  std::string cmd = "/usr/bin/python3 '" + script.string() + "' '" + csv_path_ + "' '" + png_path() + "' >/dev/null 2>&1";
  if (!wait) {
    // at the lowest priority, so that it takes no time from the ranks
    (void)!std::system(("nice -n 19 " + cmd + " &").c_str());
    return;
  }
  if (std::system(cmd.c_str()) == 0)
    log::info("loss curve: {}", png_path());
  else
    log::info("loss curve: could not draw {} (needs python3-matplotlib: scripts/setup demo)", png_path());
}

void TrainLog::close() {
  if (rank_ != 0) return;
  csv_.close();
  plot(/*wait=*/true);
}

}  // namespace pm
