// The training loop: data, model, optimizer, progress, evaluation, checkpoints.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "model/train_config.h"

namespace pm {

// Trains as the configuration says; collective. Progress goes to stderr on rank 0 (a line per
// log_every steps: step, loss, tokens/s, ms per step split into compute and exposed
// communication, pipeline degrees; validation loss every eval_every steps), the per-step CSV to
// config.log_csv. Returns the summary that rank 0 prints as one JSON line.
nlohmann::json train(Communicator& comm, TrainConfig config, Backend& backend);

}  // namespace pm
