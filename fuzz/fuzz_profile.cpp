// A performance profile (pipemoe profile --out).
#include "fuzz/fuzz_target.h"
#include "perf/perf_profile.h"

PM_FUZZ_TARGET(pm::PerfProfile::from_json(input, "fuzz profile"))
