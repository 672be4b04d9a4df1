// A training configuration file: parsed, applied and validated.
#include "fuzz/fuzz_target.h"
#include "model/train_config.h"

PM_FUZZ_TARGET(pm::parse_train_config(input, "fuzz.json").validate(2))
