#!/usr/bin/python3
"""Plot of a `pipemoe bench floor` CSV: each round's layer time over its GEMM floor, one line per
dtype and pipeline degree, with each line's median dashed and the 1.15x target dotted, and (CSVs
that have them) the expert tasks' own ratio as faint crosses and the layer against its products at
their own shapes' speed as faint triangles; beside it the round's peak and the expert shapes'
GFLOP/s, to see whether a slow round was the layer or the GEMM.

  /usr/bin/python3 bench/plot_floor.py out/floor.csv [--out out/floor.png] [--target 1.15]
"""
import argparse
import collections
import csv
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--out", help="PNG path (default: the CSV path with .png)")
    p.add_argument("--target", type=float, default=1.15, help="the ratio to draw as the target")
    a = p.parse_args()
    rows = list(csv.DictReader(open(a.csv)))
    if not rows:
        raise SystemExit(f"plot_floor: {a.csv} has no rows")
    lines = collections.OrderedDict()
    experts = collections.OrderedDict()
    shapes = collections.OrderedDict()
    peaks = collections.OrderedDict()
    shape_rates = collections.OrderedDict()
    for r in rows:
        key = (r["dtype"], int(r.get("degree", 1)))
        lines.setdefault(key, []).append((int(r["round"]), float(r["ratio"])))
        if r.get("experts_ratio"):
            experts.setdefault(key, []).append((int(r["round"]), float(r["experts_ratio"])))
        if r.get("shapes_ratio"):
            shapes.setdefault(key, []).append((int(r["round"]), float(r["shapes_ratio"])))
            shape_rates.setdefault(r["dtype"], {})[int(r["round"])] = float(r["shapes_gflops"])
        peaks.setdefault(r["dtype"], {})[int(r["round"])] = float(r["peak_gflops"])
    fig, (ax, ax_peak) = plt.subplots(1, 2, figsize=(11, 4))
    for (dtype, degree), points in lines.items():
        rounds, ratios = zip(*points)
        median = statistics.median(ratios)
        drawn = ax.plot(rounds, ratios, "o-", label=f"{dtype}, degree {degree}: median {median:.3f}x")
        ax.axhline(median, color=drawn[0].get_color(), lw=0.8, ls="--")
        if (dtype, degree) in experts:
            ax.plot(*zip(*experts[(dtype, degree)]), "x", color=drawn[0].get_color(), alpha=0.5,
                    label=f"{dtype}, degree {degree}: expert tasks alone")
        if (dtype, degree) in shapes:
            ax.plot(*zip(*shapes[(dtype, degree)]), "^", color=drawn[0].get_color(), alpha=0.5,
                    label=f"{dtype}, degree {degree}: against the expert shapes' speed")
    ax.axhline(a.target, color="gray", lw=1, ls=":", label=f"target {a.target}x")
    ax.set_xlabel("round")
    ax.set_ylabel("layer (forward + backward) / GEMM floor")
    ax.legend(fontsize=7)
    for dtype, by_round in peaks.items():
        rounds = sorted(by_round)
        drawn = ax_peak.plot(rounds, [by_round[r] for r in rounds], "s-", label=f"{dtype}: 2048^3 peak")
        if dtype in shape_rates:
            ax_peak.plot(rounds, [shape_rates[dtype][r] for r in rounds], "^--", color=drawn[0].get_color(),
                         label=f"{dtype}: the expert shapes")
    ax_peak.set_xlabel("round")
    ax_peak.set_ylabel("GFLOP/s per rank")
    ax_peak.legend(fontsize=7)
    fig.tight_layout()
    out = a.out or a.csv.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(f"plot_floor: wrote {out}")


if __name__ == "__main__":
    main()
