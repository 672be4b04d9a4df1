#!/usr/bin/python3
"""bench/gemm_ab.sh, the in-process GEMM comparison: it builds, runs one round, prints every shape,
and finds the working tree's GEMM bit-identical to HEAD's when the sources match (and says DIFFER
otherwise: the perturbed-kernel case was checked by hand when the tool was written).

Run: /usr/bin/python3 tests/cli/test_gemm_ab.py
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import ROOT, Failures  # noqa: E402

SHAPES = ["fwd u.W1", "fwd a.W2", "bwd dy.W2^T", "bwd dh.W1^T", "wgrad a^T.dy", "wgrad u^T.dh", "square 2048"]


def main():
    f = Failures()
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        print("test_gemm_ab: not a git checkout: bench/gemm_ab.sh compares against a revision; skipped")
        return 0
    proc = subprocess.run(["timeout", "600", os.path.join(ROOT, "bench", "gemm_ab.sh"), "HEAD", "1", "1"],
                          capture_output=True, text=True)
    f.check(proc.returncode == 0, f"gemm_ab.sh exit {proc.returncode}: {proc.stderr[-2000:]}")
    rows = {line[:14].strip(): line.split() for line in proc.stdout.splitlines() if line[:14].strip() in SHAPES}
    f.check(sorted(rows) == sorted(SHAPES), f"every shape reported: {sorted(rows)}")
    for name, cols in rows.items():
        f.check(all(float(x) > 0 for x in cols[-4:-1]), f"{name}: GFLOP/s of both sides and their ratio, positive")
    unchanged = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src"]).returncode == 0
    if unchanged:
        f.check(all(cols[-1] == "bit-identical" for cols in rows.values()),
                f"HEAD against an unchanged working tree: the same bits\n{proc.stdout}")
    print(proc.stdout[-1200:], flush=True)
    f.finish("test_gemm_ab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
