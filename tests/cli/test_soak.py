#!/usr/bin/python3
"""Soak: hundreds of training steps on 4 ranks with every MoE layer's pipeline degrees changing
every step (1, 2, 3, 4, 6, 8, forward and backward apart) give exactly the losses of a degree-1
run, and the ranks' resident memory stays flat (after 10 steps and at the end).

Run: /usr/bin/python3 tests/cli/test_soak.py [STEPS]   (needs build/pipemoe; default 300 steps)
"""
import csv
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402
from test_train_cli import TINY, write_text  # noqa: E402


def main():
    # Under AddressSanitizer (scripts/sanitize), freed memory waits in a quarantine of up to 256 MB
    # before it is reused, which reads as growth here: measure with the quarantine off (the other
    # checks of ASan stay on; later options in ASAN_OPTIONS override earlier ones).
    if os.environ.get("ASAN_OPTIONS"):
        os.environ["ASAN_OPTIONS"] += ":quarantine_size_mb=0"
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        config = os.path.join(tmp, "soak.json")
        json.dump(dict(TINY, data=text, max_steps=steps, log_every=50, eval_every=100, batch_size=8), open(config, "w"))
        runs = {}
        for name, env in [("degree 1", {}), ("degrees cycling", {"PIPEMOE_DEGREE_CYCLE": "1,2,3,4,6,8"})]:
            log = os.path.join(tmp, name.replace(" ", "_") + ".csv")
            proc = mpirun(4, ["train", "--config", config, "--set", "save=", "--set", f"log_csv={log}"], timeout=600,
                          env=env)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            losses = [(r["step"], r["train_loss"], r["aux_loss"], r["val_loss"]) for r in csv.DictReader(open(log))]
            runs[name] = (result, losses)
            growth = result["rss_mb_end"] - result["rss_mb_step_10"]
            print(f"ok: {name}: {len(losses)} steps, resident {result['rss_mb_step_10']:.1f} MB after 10 steps, "
                  f"{result['rss_mb_end']:.1f} MB at the end ({growth:+.1f} MB), peak {result['peak_rss_mb']:.1f} MB",
                  flush=True)
            f.check(len(losses) == steps, f"{name}: a row per step")
            f.check(growth <= max(8.0, 0.05 * result["rss_mb_step_10"]),
                    f"{name}: resident memory grew {growth:.1f} MB over {steps} steps")
        f.check(runs["degree 1"][1] == runs["degrees cycling"][1], "cycling degrees: the same losses, bit for bit")
    f.finish("test_soak")


if __name__ == "__main__":
    main()
