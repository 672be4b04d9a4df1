#!/usr/bin/python3
"""Two pipemoe binaries (say, the previous commit's and this one's) on the same command, in
interleaved rounds: A then B, B then A, ... so that both see the same drift of this noisy host.
Reads the last JSON line each run prints (`layer --json`, `train`), prints a table of the chosen
keys per round with the medians and B/A, and writes a CSV.

  /usr/bin/python3 bench/ab_binaries.py --a /tmp/old/pipemoe --b build/pipemoe --ranks 2 \\
      --rounds 5 --keys forward_ms,backward_ms --csv out/ab_layer.csv -- layer --iters 10 --json

Every run is under `timeout` (--timeout, 600 s): a hung rank fails the benchmark, not the host.

The same binary with two settings: --a-args / --b-args are appended to each side's command, e.g.
`--a build/pipemoe --b build/pipemoe --a-args "--dedup-dispatch false"`. --launcher goes before
mpirun, e.g. `--launcher "scripts/emulate-cluster --hosts 2 --rate 1gbit --"` for the emulated
1 Gbit/s network.
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys


def run(binary, ranks, args, timeout, env, launcher=()):
    cmd = ["timeout", "--kill-after=5", str(timeout), *launcher, "mpirun", "-q", "--oversubscribe", "-np",
           str(ranks), binary] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"ab_binaries: exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"ab_binaries: no JSON line in the output of {' '.join(cmd)}")


def value_of(j, key):
    """A number of the run's JSON: a top-level key, or PASS.TASK, a task's ms summed over its lanes in tasks_ms."""
    if key in j:
        return float(j[key])
    pass_name, _, task = key.partition(".")
    found = [t["ms"] for t in j.get("tasks_ms", []) if t["pass"] == pass_name and t["task"] == task]
    if not found:
        sys.exit(f"ab_binaries: no key or task '{key}' in the run's JSON")
    return float(sum(found))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="the first binary (the baseline)")
    p.add_argument("--b", required=True, help="the second binary")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--keys", required=True, help="comma-separated JSON keys to compare (summed into 'total')")
    p.add_argument("--info-keys", default="",
                   help="comma-separated JSON keys shown and written beside them, not summed (rows sent, a2a_busy_ms); "
                        "PASS.TASK (e.g. forward.gate): that task's ms per pass from `layer --json`'s tasks_ms")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--csv", default="out/ab_binaries.csv")
    p.add_argument("--a-args", default="", help="arguments appended to A's command")
    p.add_argument("--b-args", default="", help="arguments appended to B's command")
    p.add_argument("--launcher", default="", help="a command that runs mpirun (emulate-cluster ... --)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the pipemoe arguments")
    o = p.parse_args()
    args = o.command[1:] if o.command[:1] == ["--"] else o.command
    keys = o.keys.split(",")
    info = [k for k in o.info_keys.split(",") if k]
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    rows = []
    for r in range(o.rounds):
        a, b = ("A", o.a, shlex.split(o.a_args)), ("B", o.b, shlex.split(o.b_args))
        for side, binary, extra in ([a, b] if r % 2 == 0 else [b, a]):
            j = run(binary, o.ranks, args + extra, o.timeout, env, shlex.split(o.launcher))
            values = [value_of(j, k) for k in keys]
            shown = {k: value_of(j, k) for k in info}
            rows.append({"round": r, "side": side, **dict(zip(keys, values)), "total": sum(values), **shown})
            print(f"round {r} {side}: " + " ".join(f"{k} {v:.2f}" for k, v in zip(keys + info, values + list(shown.values()))),
                  flush=True)
    print(f"\n{'key':<24} {'A median':>12} {'B median':>12} {'B / A':>8}")
    for k in keys + ["total"] + info:
        a = statistics.median(row[k] for row in rows if row["side"] == "A")
        b = statistics.median(row[k] for row in rows if row["side"] == "B")
        print(f"{k:<24} {a:12.3f} {b:12.3f} {b / a if a else float('nan'):8.3f}")
    per_round = [next(x["total"] for x in rows if x["round"] == r and x["side"] == "B") /
                 next(x["total"] for x in rows if x["round"] == r and x["side"] == "A") for r in range(o.rounds)]
    print("B / A per round (total): " + ", ".join(f"{x:.3f}" for x in per_round) +
          f"; median {statistics.median(per_round):.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(o.csv)), exist_ok=True)
    with open(o.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "side"] + keys + ["total"] + info)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {o.csv}")


if __name__ == "__main__":
    main()
