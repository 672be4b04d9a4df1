// A .npy file (layer --dump, the reference tests' inputs).
#include "fuzz/fuzz_target.h"
#include "core/npy.h"

PM_FUZZ_TARGET(pm::decode_npy(input, "fuzz.npy"))
