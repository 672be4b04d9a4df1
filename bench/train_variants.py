#!/usr/bin/python3
"""Training throughput of model variants side by side, in interleaved rounds (every variant once
per round, each round starting at another variant): ms per step, tokens/s, exposed communication
and the share of the MoE all-to-alls hidden behind computation (ScMoE's figure of merit), medians
over rounds. Run it inside scripts/emulate-cluster to put a slow network between the ranks:

  scripts/emulate-cluster --hosts 2 --rate 300mbit -- /usr/bin/python3 bench/train_variants.py \\
      --variant "top-2=--config configs/demo.json --degree 1" \\
      --variant "scmoe=--config configs/scmoe.json --degree 1" \\
      --rounds 3 --common "--max-steps 16 --set batch_size=48" --csv out/train_variants.csv

With --command generate the variants are `pipemoe generate` runs (e.g. "--checkpoint CK ...") and
the table is inference tokens/s (all sequences) per variant. With --command layer they are
`pipemoe layer` runs (e.g. "--strategy ppmoe --tp 2 --tokens 2048"): forward, backward and
tokens/s of all ranks; --np sets the ranks (default 2), e.g. PPMoE against all-to-all EP on two
emulated hosts of two ranks each:

  scripts/emulate-cluster --hosts 2 --ranks-per-host 2 --rate 1gbit -- /usr/bin/python3 \
      bench/train_variants.py --command layer --np 4 --common "--model-dim 256 --hidden 512 --iters 5" \
      --variant "ep d1=--strategy ep --tokens 512" --variant "ppmoe tp2=--strategy ppmoe --tp 2 --tokens 1024"

Every run is under `timeout`; a failed run stops the benchmark with its error.
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys

KEYS = {"train": ["ms_per_step", "tokens_per_s", "exposed_comm_ms_per_step", "comm_hidden_share", "train_loss",
                  "val_loss", "parameters", "pipeline_bubble", "pipeline_bubble_formula", "peak_rss_mb"],
        "generate": ["tokens_per_s", "seconds", "kv_cache_bytes"],
        "layer": ["forward_ms", "backward_ms", "tokens_per_s", "a2a_busy_ms", "comm_ms", "compute_ms", "degree_fwd",
                  "degree_bwd", "peak_rss_mb", "held_for_backward_mb"]}


def run(command, args, timeout, env, ranks=2):
    cmd = ["timeout", "--kill-after=5", str(timeout), "mpirun", "-q", "--oversubscribe", "--allow-run-as-root",
           "-np", str(ranks), os.environ.get("PIPEMOE_BIN", "build/pipemoe"), command] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if proc.returncode != 0:
        sys.exit(f"train_variants: exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"train_variants: no JSON line from {' '.join(cmd)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help='"name=train (or generate) arguments"')
    p.add_argument("--command", choices=sorted(KEYS), default="train")
    p.add_argument("--common", default="", help="arguments every variant gets")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--np", type=int, default=2, help="ranks")
    p.add_argument("--csv", default="out/train_variants.csv")
    o = p.parse_args()
    variants = []
    for v in o.variant:
        name, _, args = v.partition("=")
        extra = ["--set", "save=", "--set", "log_csv=/tmp/train_variants_log.csv"] if o.command == "train" else ["--json"]
        variants.append((name, shlex.split(args) + shlex.split(o.common) + extra))
    keys = KEYS[o.command]
    env = dict(os.environ)
    rows = []
    for r in range(o.rounds):
        for i in range(len(variants)):
            name, args = variants[(i + r) % len(variants)]
            j = run(o.command, args, o.timeout, env, o.np)
            row = {"round": r, "variant": name, **{k: j.get(k) for k in keys}}
            rows.append(row)
            print(f"round {r} {name}: " + " ".join(f"{k} {row[k]:.4g}" for k in keys if row[k] is not None), flush=True)
    if o.command == "layer":
        print(f"\n{'variant':<20} {'fwd ms':>8} {'bwd ms':>8} {'comm busy':>10} {'degrees':>8} {'tokens/s':>9} {'vs first':>9} "
              f"{'peak MB':>8} {'kept MB':>8}")
    elif o.command == "train":
        print(f"\n{'variant':<16} {'ms/step':>9} {'tokens/s':>9} {'exposed ms':>11} {'a2a hidden':>11} {'bubble':>7} "
              f"{'(1F1B)':>7} {'vs first':>9} {'peak MB':>8} {'params M':>9} {'val loss':>9}")
    else:
        print(f"\n{'variant':<16} {'tokens/s':>9} {'vs first':>9} {'KV cache MB':>12}")
    first = None
    for name, _ in variants:
        mine = [x for x in rows if x["variant"] == name]
        med = {k: statistics.median(x[k] for x in mine if x[k] is not None) if any(x[k] is not None for x in mine)
               else float("nan") for k in keys}
        if o.command == "layer":
            first = first or med["tokens_per_s"]
            print(f"{name:<20} {med['forward_ms']:8.1f} {med['backward_ms']:8.1f} {med['a2a_busy_ms']:10.1f} "
                  f"{med['degree_fwd']:>4.0f}/{med['degree_bwd']:<3.0f} {med['tokens_per_s']:9.0f} {med['tokens_per_s'] / first:8.2f}x "
                  f"{med['peak_rss_mb']:8.1f} {med['held_for_backward_mb']:8.1f}")
        elif o.command == "train":
            # tokens/s, not ms/step: variants may take different batches per step
            first = first or med["tokens_per_s"]
            bubble = f"{med['pipeline_bubble'] * 100:6.0f}% {med['pipeline_bubble_formula'] * 100:6.0f}%" \
                if med["pipeline_bubble"] == med["pipeline_bubble"] else f"{'-':>7} {'-':>7}"
            print(f"{name:<16} {med['ms_per_step']:9.1f} {med['tokens_per_s']:9.0f} {med['exposed_comm_ms_per_step']:11.1f} "
                  f"{med['comm_hidden_share'] * 100:10.0f}% {bubble} {med['tokens_per_s'] / first:8.2f}x "
                  f"{med['peak_rss_mb']:8.1f} {med['parameters'] / 1e6:9.2f} {med['val_loss']:9.4f}")
        else:
            first = first or med["tokens_per_s"]
            print(f"{name:<16} {med['tokens_per_s']:9.1f} {med['tokens_per_s'] / first:8.2f}x "
                  f"{med['kv_cache_bytes'] / 1e6:12.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(o.csv)), exist_ok=True)
    with open(o.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "variant"] + keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {o.csv}")


if __name__ == "__main__":
    main()
