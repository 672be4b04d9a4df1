// What a training run shows: the progress line, the validation line, the per-step CSV and the
// loss-curve PNG. Every field of a progress line is over the same window (the steps since the
// previous line): means of loss, aux loss, gradient norm, step time, its compute and exposed
// communication, dropped tokens and the experts' load, and tokens/s as the window's tokens over
// its time; lr is the window's last step's. Elapsed time counts from the first step, the ETA from
// the window's mean step time and the last evaluation's time. The share of the MoE all-to-alls
// hidden behind computation is over the window's all-to-all time.
#pragma once

#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "model/train_config.h"

namespace pm {

// One step, the same on every rank (reduced over the ranks).
struct StepRecord {
  int64_t step = 0;  // 1-based
  double lr = 0, loss = 0, aux = 0, grad_norm = 0;
  double z_loss = 0;  // router z-losses (shown when z_loss_coef > 0)
  double step_ms = 0, exposed_ms = 0;  // means over ranks; compute = step - exposed
  double pipeline_wait_ms = 0;         // pp > 1: waiting for the other stages (bubble, links), mean over ranks
  double dropped_share = 0;            // choices over capacity, all MoE layers and ranks
  std::vector<double> load_max, load_mean;  // per MoE layer: tokens routed per expert, max and mean over experts
  double comm_hidden_share = 0;             // the MoE all-to-alls' time during which the compute lane computed
  double comm_hidden_total_s = 0, comm_hidden_s = 0;  // its parts, summed over ranks
  std::vector<double> block_hidden_share;   // the same per MoE layer
  std::optional<double> val_loss;
};

class TrainLog {
 public:
  // rank: only rank 0 writes; csv_path opened (appended to when resuming and it exists).
  TrainLog(const TrainConfig& config, int rank, int64_t tokens_per_step, int moe_layers, int64_t first_step,
           int64_t last_step, const std::string& csv_path, bool resuming);

  // The CSV could not be opened (rank 0): the message; empty otherwise.
  const std::string& open_error() const { return open_error_; }

  // Writes the step's CSV row; prints the progress line when the window is full (or at the last
  // step) and the validation line when there is one; redraws the loss PNG after an evaluation.
  void record(const StepRecord& r, const std::string& moe_schedule, double eval_s, double val_bytes_per_token,
              double unigram);
  // The mean training loss of the last printed window.
  double last_window_loss() const { return last_window_loss_; }
  void close();  // flushes, draws the final PNG
  const std::string& csv_path() const { return csv_path_; }
  std::string png_path() const;

 private:
  void print_window(const StepRecord& last, const std::string& moe_schedule);
  void plot(bool wait) const;

  const TrainConfig& c_;
  int rank_;
  int64_t tokens_per_step_;
  int moe_layers_;
  int64_t first_step_, last_step_;
  std::string csv_path_, open_error_;
  std::ofstream csv_;
  double started_s_;
  double last_eval_s_ = 0;
  std::vector<StepRecord> window_;
  double last_window_loss_ = 0;
};

}  // namespace pm
