#!/usr/bin/python3
"""Side-by-side: `pipemoe layer` against the plain PyTorch expert-parallel layer, same shapes.

Runs the two alternately for several rounds (this machine is shared and noisy: alternation keeps
both exposed to the same noise), prints a table of step times and the speedup of the medians,
and writes one CSV row per run.

  /usr/bin/python3 bench/compare_torch.py [--ranks 2 --tokens 2048 --model-dim 512 --hidden 1024
      --experts 8 --top-k 2 --capacity-factor 1.25] [--rounds 3] [--iters 10] [--degree 1]
      [--csv out/compare_torch.csv]

PyTorch gets its best BLAS setting: if its OpenBLAS does not use AVX-512 kernels on a CPU that has
them, OPENBLAS_CORETYPE=SkylakeX is set for it (the same rule pipemoe applies to itself).
"""
import argparse
import csv
import ctypes
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BINARY = os.environ.get("PIPEMOE_BIN", os.path.join(ROOT, "build", "pipemoe"))


def cpu_has_avx512():
    with open("/proc/cpuinfo") as f:
        flags = next((l for l in f if l.startswith("flags")), "")
    return all(x in flags.split() for x in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def torch_env():
    """PyTorch's environment: OPENBLAS_CORETYPE=SkylakeX when its OpenBLAS picks a lesser core."""
    env = dict(os.environ)
    if "OPENBLAS_CORETYPE" in env:
        return env
    try:
        lib = ctypes.CDLL("libblas.so.3")  # what Debian's torch links
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        core = "unknown"
    if cpu_has_avx512() and core.lower() not in ("skylakex", "cooperlake", "sapphirerapids"):
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def shape_args(a):
    return ["--tokens", a.tokens, "--model-dim", a.model_dim, "--hidden", a.hidden, "--experts", a.experts,
            "--top-k", a.top_k, "--capacity-factor", a.capacity_factor]


def run_ours(a):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["timeout", "600", "mpirun", "-q", "--oversubscribe", "-np", str(a.ranks), BINARY, "layer"] + \
        [str(x) for x in shape_args(a)] + ["--iters", str(a.iters), "--degree", str(a.degree), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"pipemoe failed: {out.stderr}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["forward_ms"], d["backward_ms"]


def run_torch(a):
    cmd = ["timeout", "600", "/usr/bin/python3", os.path.join(HERE, "torch_moe_layer.py"), "--ranks", str(a.ranks),
           "--iters", str(a.iters)] + [str(x) for x in shape_args(a)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=torch_env())
    if out.returncode != 0:
        sys.exit(f"torch baseline failed: {out.stderr}")
    line = out.stdout.strip().splitlines()[-1]
    fwd = float(line.split("forward ")[1].split(" ms")[0])
    bwd = float(line.split("backward ")[1].split(" ms")[0])
    return fwd, bwd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--degree", default="1", help="pipemoe's pipeline degree")
    p.add_argument("--csv", default=os.path.join(ROOT, "out", "compare_torch.csv"))
    a = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    blas = torch_env().get("OPENBLAS_CORETYPE", "auto-detected")
    rows = []
    for r in range(a.rounds):
        for impl, fn in (("pipemoe", run_ours), ("torch", run_torch)):
            fwd, bwd = fn(a)
            rows.append((impl, r, fwd, bwd, fwd + bwd))
            print(f"round {r}: {impl:8s} forward {fwd:8.2f} ms  backward {bwd:8.2f} ms  step {fwd + bwd:8.2f} ms",
                  flush=True)
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["impl", "round", "ranks", "tokens", "model_dim", "hidden", "experts", "top_k",
                    "capacity_factor", "degree", "forward_ms", "backward_ms", "step_ms"])
        for impl, r, fwd, bwd, step in rows:
            w.writerow([impl, r, a.ranks, a.tokens, a.model_dim, a.hidden, a.experts, a.top_k, a.capacity_factor,
                        a.degree if impl == "pipemoe" else "", f"{fwd:.3f}", f"{bwd:.3f}", f"{step:.3f}"])
    med = {impl: statistics.median(x[4] for x in rows if x[0] == impl) for impl in ("pipemoe", "torch")}
    # each round's two runs were back to back: their ratio is the least noisy figure on a shared host
    ratios = [t[4] / o[4] for o, t in zip(rows[0::2], rows[1::2])]
    print(f"\nmedian step over {a.rounds} rounds: pipemoe {med['pipemoe']:.1f} ms, torch {med['torch']:.1f} ms "
          f"(torch OpenBLAS core: {blas}); speedup of medians {med['torch'] / med['pipemoe']:.2f}x")
    print(f"per-round speedups: {' '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
