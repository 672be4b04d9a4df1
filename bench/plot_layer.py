#!/usr/bin/python3
"""Plots of a `pipemoe bench layer` CSV: time against pipeline degree per shape (measured and
predicted, the planner's and the best choices marked), the regret of the planner's choices,
predicted against measured times, and the chosen degrees' time against the lower bounds.

  /usr/bin/python3 bench/plot_layer.py out/bench_layer.csv [--out out/bench_layer]
writes OUT_degrees.png, OUT_regret.png, OUT_prediction.png, (CSVs with the bound ratios)
OUT_bound.png and, from CSV_sums.csv beside it, OUT_sums.png: the grid's total time under the
planner, the per-shape best and every fixed degree.
"""
import argparse
import collections
import csv
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    shapes = collections.OrderedDict()
    for r in csv.DictReader(open(path)):
        shapes.setdefault(r["shape"], []).append(r)
    return shapes


def label(rows):
    r = rows[0]
    return f"T={r['tokens']} M={r['model_dim']} H={r['hidden']} E={r['experts']} k={r['top_k']}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--out", help="prefix of the PNG files (default: the CSV path without .csv)")
    a = p.parse_args()
    out = a.out or a.csv.rsplit(".", 1)[0]
    shapes = load(a.csv)

    # time against degree, one panel per shape
    n = len(shapes)
    cols = min(6, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    regrets, refined_regrets, measured, predicted = [], [], [], []
    for ax, (shape, rows) in zip(axes.flat, shapes.items()):
        d = [int(r["degree"]) for r in rows]
        step = [float(r["forward_ms"]) + float(r["backward_ms"]) for r in rows]
        pred = [float(r["predicted_fwd_ms"]) + float(r["predicted_bwd_ms"]) for r in rows]
        ax.plot(d, step, "o-", label="measured")
        ax.plot(d, pred, "s--", label="predicted")
        bound = max(float(rows[0]["comm_alone_ms"]), float(rows[0]["compute_alone_ms"]))
        ax.axhline(bound, color="gray", lw=0.8, ls=":", label="max(comm, compute)")
        if "comm_fwd_alone_ms" in rows[0]:
            r0 = {k: float(rows[0][k]) for k in ("comm_fwd_alone_ms", "comm_bwd_alone_ms",
                                                 "compute_fwd_alone_ms", "compute_bwd_alone_ms")}
            per_pass = (max(r0["comm_fwd_alone_ms"], r0["compute_fwd_alone_ms"])
                        + max(r0["comm_bwd_alone_ms"], r0["compute_bwd_alone_ms"]))
            ax.axhline(per_pass, color="gray", lw=0.8, ls="--", label="per pass")
        by = {int(r["degree"]): r for r in rows}
        pf, pb = int(rows[0]["planner_fwd_degree"]), int(rows[0]["planner_bwd_degree"])
        rf, rb = int(rows[0]["refined_fwd_degree"]), int(rows[0]["refined_bwd_degree"])
        bf, bb = int(rows[0]["best_fwd_degree"]), int(rows[0]["best_bwd_degree"])
        chosen = float(by[pf]["forward_ms"]) + float(by[pb]["backward_ms"])
        refined = float(by[rf]["forward_ms"]) + float(by[rb]["backward_ms"])
        best = float(by[bf]["forward_ms"]) + float(by[bb]["backward_ms"])
        regrets.append(100 * (chosen / best - 1))
        refined_regrets.append(100 * (refined / best - 1))
        ax.set_title(f"{label(rows)}\nplanner {pf}/{pb}, best {bf}/{bb}", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.tick_params(labelsize=6)
        for r in rows:
            for kind in ("fwd", "bwd"):
                key = "forward_ms" if kind == "fwd" else "backward_ms"
                measured.append(float(r[key]))
                predicted.append(float(r[f"predicted_{kind}_ms"]))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("pipeline degree (forward = backward)")
    fig.supylabel("forward + backward ms")
    fig.tight_layout()
    fig.savefig(f"{out}_degrees.png", dpi=110)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = [0, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50]
    ax.hist([regrets, refined_regrets], bins=bins, label=["planner", "planner + refinement"])
    ax.axvline(5, color="red", lw=0.8, ls=":")
    ax.set_xlabel("regret: chosen / best measured - 1 (%)")
    ax.set_ylabel("shapes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}_regret.png", dpi=110)

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(measured, predicted, s=6)
    hi = max(measured + predicted)
    ax.plot([0, hi], [0, hi], color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    fig.tight_layout()
    fig.savefig(f"{out}_prediction.png", dpi=110)
    written = [f"{out}_degrees.png", f"{out}_regret.png", f"{out}_prediction.png"]

    # chosen / bound for the shapes whose communication is 30-70% of the sequential time
    first = [rows[0] for rows in shapes.values()]
    if "chosen_over_pass_bound" in first[0]:
        in_range = [r for r in first
                    if 0.3 <= float(r["comm_alone_ms"]) / (float(r["comm_alone_ms"]) + float(r["compute_alone_ms"])) <= 0.7]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = [1.0 + 0.025 * i for i in range(25)]
        ax.hist([[float(r["chosen_over_bound"]) for r in in_range],
                 [float(r["chosen_over_pass_bound"]) for r in in_range]], bins=bins,
                label=["/ max(all comm, all compute)", "/ sum over passes of max(comm, compute)"])
        ax.axvline(1.15, color="red", lw=0.8, ls=":")
        ax.set_xlabel(f"chosen degrees' time / lower bound ({len(in_range)} shapes, comm 30-70%)")
        ax.set_ylabel("shapes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}_bound.png", dpi=110)
        written.append(f"{out}_bound.png")
    written += plot_sums(a.csv, out)
    print("wrote " + ", ".join(written))


def plot_sums(csv_path, out):
    """The grid's total time under each policy (CSV_sums.csv beside the main CSV, if there)."""
    import os
    path = csv_path.rsplit(".", 1)[0] + "_sums.csv"
    if not os.path.exists(path):
        return []
    rows = list(csv.DictReader(open(path)))
    names = [r["policy"] + (f" {r['degree']}" if r["degree"] != "0" else "") for r in rows]
    ms = [float(r["sum_ms"]) for r in rows]
    colors = ["tab:green" if r["policy"] == "planner" else "tab:gray" if r["policy"] == "fixed" else "tab:blue"
              for r in rows]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1))
    ax.barh(names[::-1], ms[::-1], color=colors[::-1])
    planner = ms[names.index("planner")] if "planner" in names else None
    if planner:
        ax.axvline(planner, color="tab:green", lw=0.8, ls=":")
    lo = min(ms)
    ax.set_xlim(lo * 0.9, max(ms) * 1.02)
    for i, v in enumerate(ms[::-1]):
        ax.text(v, i, f" {v:.0f}" + (f" ({100 * (v / planner - 1):+.1f}%)" if planner else ""), va="center", fontsize=7)
    ax.set_xlabel(f"sum over {rows[0]['shapes']} shapes of forward + backward (ms)")
    fig.tight_layout()
    fig.savefig(f"{out}_sums.png", dpi=110)
    return [f"{out}_sums.png"]


if __name__ == "__main__":
    main()
