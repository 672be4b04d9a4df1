// A checkpoint's state.json, and the configuration inside it as generate checks it.
#include "fuzz/fuzz_target.h"
#include "model/checkpoint.h"
#include "model/train_config.h"

PM_FUZZ_TARGET({
  pm::CheckpointState s = pm::parse_checkpoint_state(input, "fuzz");
  pm::TrainConfig c;
  c.apply(s.config, "fuzz/state.json");
  c.validate(1);
})
