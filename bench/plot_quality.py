#!/usr/bin/python3
"""ScMoE against top-2 MoE: validation and training loss curves of bench/quality_scmoe.sh's runs
(out/quality_<demo|scmoe>_s<seed>.csv) on one PNG, and a table of the final validation losses.

Run: /usr/bin/python3 bench/plot_quality.py [--out docs/img/scmoe_quality.png]
"""
import argparse
import csv
import glob
import os
import re
import statistics

NAMES = {"demo": "top-2 MoE (configs/demo.json)", "scmoe": "ScMoE pos2, shared + top-1 (configs/scmoe.json)"}


def load(path):
    rows = list(csv.DictReader(open(path)))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows]
    return val, train


def smooth(points, window=25):
    out = []
    for i in range(len(points)):
        part = points[max(0, i - window + 1):i + 1]
        out.append((points[i][0], sum(v for _, v in part) / len(part)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img/scmoe_quality.png")
    o = p.parse_args()
    runs = {}
    for path in sorted(glob.glob("out/quality_*_s*.csv")):
        m = re.match(r".*quality_(\w+?)_s(\d+)\.csv", path)
        val, train = load(path)
        if val:  # a run that has not reached its first evaluation yet is left out
            runs.setdefault(m.group(1), {})[int(m.group(2))] = (val, train)
    finals = {}
    print(f"{'variant':<50} {'seed':>4} {'steps':>6} {'val loss':>9}")
    for cfg, seeds in runs.items():
        for seed, (val, _) in sorted(seeds.items()):
            print(f"{NAMES.get(cfg, cfg):<50} {seed:>4} {val[-1][0]:>6} {val[-1][1]:>9.4f}")
            finals.setdefault(cfg, {})[seed] = val[-1]
    both = sorted(set(finals.get("demo", {})) & set(finals.get("scmoe", {})))
    both = [s for s in both if finals["demo"][s][0] == finals["scmoe"][s][0]]  # seeds that finished both
    if both:
        ratios = [finals["scmoe"][s][1] / finals["demo"][s][1] for s in both]
        print(f"ScMoE / top-2 final validation loss, seeds {both}: " + ", ".join(f"{r:.4f}" for r in ratios) +
              f" (mean {statistics.mean(ratios):.4f})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (scripts/setup bench installs it)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"demo": "tab:blue", "scmoe": "tab:red"}
    for cfg, seeds in runs.items():
        for i, (seed, (val, train)) in enumerate(sorted(seeds.items())):
            label = f"{NAMES.get(cfg, cfg)}" if i == 0 else None
            ax1.plot(*zip(*val), marker="o", color=colors.get(cfg), alpha=0.9 - 0.25 * i, label=label)
            ax2.plot(*zip(*smooth(train)), color=colors.get(cfg), alpha=0.9 - 0.25 * i, label=label)
    ax1.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation (each seed a line)")
    ax2.set(xlabel="step", ylabel="training loss, 25-step mean", title="training")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Brown corpus, 2 ranks, same tokens and seeds: ScMoE vs top-2 MoE")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(o.out)), exist_ok=True)
    fig.savefig(o.out, dpi=110)
    print(f"wrote {o.out}")


if __name__ == "__main__":
    main()
