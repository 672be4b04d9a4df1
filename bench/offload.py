#!/usr/bin/python3
"""Expert offloading for memory-limited inference: generation with every routed expert resident,
loaded when needed (blocking) and prefetched on the copy lane, in interleaved rounds (each round
runs every mode once, starting at another). Reports ms per generated token, the latency the
experts' migration adds over all-resident, how much of it prefetching removes, and the expert
memory kept resident. One rank, one compute thread (the copy lane gets the other core, as a GPU's
copy engine would).

  /usr/bin/python3 bench/offload.py --checkpoint runs/scmoe --where disk --cache 1 --rounds 5 \\
      --tokens 120 --csv out/offload.csv
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

MODES = ["resident", "blocking", "prefetch"]


def run(o, mode):
    cmd = ["timeout", "600", os.environ.get("PIPEMOE_BIN", "build/pipemoe"), "--threads", "1", "generate",
           "--checkpoint", o.checkpoint, "--tokens", str(o.tokens), "--json", "--offload-experts", o.where,
           "--expert-cache", str(o.cache), "--offload-mode", mode, "--seed", "3"]
    for p in o.prompts:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        sys.exit(f"offload: exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--where", default="disk", choices=["host", "disk"])
    p.add_argument("--cache", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--prompt", dest="prompts", action="append", default=None)
    p.add_argument("--csv", default="out/offload.csv")
    o = p.parse_args()
    o.prompts = o.prompts or ["The jury said", "It was the first time", "The county court", "In the morning"]
    rows = []
    for r in range(o.rounds):
        for i in range(len(MODES)):
            mode = MODES[(i + r) % len(MODES)]
            j = run(o, mode)
            ms = 1e3 * j["seconds"] / (j["sequences"] * j["tokens"])
            rows.append({"round": r, "mode": mode, "ms_per_token": ms, "tokens_per_s": j["tokens_per_s"],
                         "expert_loads": j["expert_loads"], "expert_load_s": j["expert_load_s"],
                         "resident_expert_bytes_peak": j["resident_expert_bytes_peak"],
                         "all_expert_bytes": j["all_expert_bytes"]})
            print(f"round {r} {mode:<9} {ms:7.3f} ms/token, {j['expert_loads']} loads, "
                  f"{j['resident_expert_bytes_peak'] / 1e6:.2f} of {j['all_expert_bytes'] / 1e6:.2f} MB resident", flush=True)
    med = {m: statistics.median(x["ms_per_token"] for x in rows if x["mode"] == m) for m in MODES}
    # the migration's added latency per round (same round: the same drift), then the median
    added = {m: statistics.median(
        next(x["ms_per_token"] for x in rows if x["round"] == r and x["mode"] == m) -
        next(x["ms_per_token"] for x in rows if x["round"] == r and x["mode"] == "resident") for r in range(o.rounds))
        for m in ("blocking", "prefetch")}
    peak = {m: max(x["resident_expert_bytes_peak"] for x in rows if x["mode"] == m) for m in MODES}
    print(f"\n{'mode':<10} {'ms/token':>9} {'tokens/s':>9} {'added ms/token':>15} {'resident MB':>12}")
    for m in MODES:
        print(f"{m:<10} {med[m]:9.3f} {1e3 / med[m]:9.1f} {added.get(m, 0.0):15.3f} {peak[m] / 1e6:12.2f}")
    cut = 1 - added["prefetch"] / added["blocking"] if added["blocking"] > 0 else float("nan")
    print(f"expert memory resident: {peak['prefetch'] / peak['resident']:.0%} of all-resident; migration latency "
          f"cut by prefetching: {cut:.0%} (added {added['prefetch']:.3f} vs {added['blocking']:.3f} ms/token blocking)")
    os.makedirs(os.path.dirname(os.path.abspath(o.csv)), exist_ok=True)
    with open(o.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {o.csv}")


if __name__ == "__main__":
    main()
