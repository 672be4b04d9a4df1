// A safetensors file (checkpoints' model and optimizer tensors).
#include "fuzz/fuzz_target.h"
#include "model/safetensors.h"

PM_FUZZ_TARGET(pm::decode_safetensors(input, "fuzz.safetensors"))
