#!/usr/bin/env bash
# Expert load balance on the demo model, three ways: no balancing, the GShard aux loss
# (aux_coef 0.01, the demo's), and auxiliary-loss-free balancing (router_bias_rate, DeepSeek-V3).
# STEPS steps each (default 150), 2 ranks; prints one table from the CSVs (steps after 20): the
# busiest expert over the mean, the share of choices dropped, the final validation loss.
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
steps=${STEPS:-150}
bin=${PIPEMOE_BIN:-build/pipemoe}
run() {  # name, then --set overrides
  local name=$1; shift
  timeout 1800 mpirun -q --oversubscribe -np 2 $bin train --config configs/demo.json --max-steps $steps \
    --set save= --set eval_every=$steps --set log_every=50 --log-csv out/balance_$name.csv "$@" > out/balance_$name.out 2>&1
}
run none --set aux_coef=0
run aux --set aux_coef=0.01
run bias --set aux_coef=0 --set router_bias_rate=${RATE:-0.001}
/usr/bin/python3 - <<'PY'
import csv
print(f"{'balancing':<28} {'load max/mean':>14} {'dropped %':>10} {'val loss':>9}")
for name, what in [("none", "none (aux_coef 0)"), ("aux", "aux loss (aux_coef 0.01)"), ("bias", "bias (router_bias_rate)")]:
    rows = list(csv.DictReader(open(f"out/balance_{name}.csv")))
    late = [r for r in rows if int(r["step"]) > 20]
    layers = sorted({k[:-len("_load_max")] for k in rows[0] if k.endswith("_load_max")})
    ratio = sum(float(r[f"{l}_load_max"]) / float(r[f"{l}_load_mean"]) for r in late for l in layers) / (len(late) * len(layers))
    dropped = sum(float(r["dropped_share"]) for r in late) / len(late) * 100
    val = [r["val_loss"] for r in rows if r["val_loss"]][-1]
    print(f"{what:<28} {ratio:>14.3f} {dropped:>10.2f} {float(val):>9.4f}")
PY
