#!/usr/bin/python3
"""`train --breakdown-steps N` (config key breakdown_steps): where a step goes, each task's time per
step summed over layers and chunks, on the rank that spent the most on it, printed at the end and
in the final JSON (`step_breakdown_ms`). Checked against the Chrome trace of the same step (one
step summed, `--trace` of the last step: every (pass, task) the same ms, the largest over the
ranks), with the trace file still holding one step when the breakdown covers more; none without
the key; a negative count refused with one clear line.

Run: /usr/bin/python3 tests/cli/test_train_breakdown.py   (needs build/pipemoe)
"""
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failures  # noqa: E402
from test_train_cli import TINY, one_error, train, write_text  # noqa: E402


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trace_sums(path):
    """(pass, task without its chunk) -> ms of the trace, the largest over the ranks; and each rank's
    count of optimizer spans (one per traced step)."""
    t = json.load(open(path))
    events = t["traceEvents"] if isinstance(t, dict) else t
    per_rank = collections.defaultdict(float)
    optimizer = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        key = (e["pid"], e["cat"], e["name"].split("[")[0])
        per_rank[key] += e["dur"] / 1000
        optimizer[e["pid"]] += e["name"] == "optimizer"
    largest = {}
    for (_, cat, name), ms in per_rank.items():
        largest[(cat, name)] = max(largest.get((cat, name), 0.0), ms)
    return largest, optimizer


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        config = os.path.join(tmp, "tiny.json")
        json.dump(dict(TINY, data=text, max_steps=4, eval_every=100), open(config, "w"))

        # one step summed: the breakdown of the traced step, task by task
        trace = os.path.join(tmp, "step.json")
        result = last_json(train(2, config, "--breakdown-steps", "1", "--trace", trace))
        rows = result.get("step_breakdown_ms") or []
        mine = collections.defaultdict(float)  # summed over lanes, as the check below reads the trace
        for r in rows:
            f.check("[" not in r["task"] and r["ms"] >= 0, f"a row named with its chunk or negative: {r}")
            mine[(r["pass"], r["task"])] += r["ms"]
        for key in [("forward", "attention"), ("backward", "attention_bwd"), ("forward", "expert"),
                    ("backward", "expert_wgrad"), ("backward", "optimizer")]:
            f.check(key in mine, f"no row for {key}: {sorted(mine)}")
        traced, optimizer = trace_sums(trace)
        f.check(set(mine) == set(traced), f"the breakdown's tasks {sorted(mine)} against the trace's {sorted(traced)}")
        far = [(k, mine[k], traced[k]) for k in mine if k in traced and abs(mine[k] - traced[k]) > 1e-3 + 1e-3 * traced[k]]
        f.check(not far, f"tasks whose ms differ from the trace's: {far[:5]}")
        if not far:
            print(f"ok: {len(rows)} rows, each the trace's ms of the same step", flush=True)

        # three steps summed: the trace file still holds one
        three = os.path.join(tmp, "three.json")
        result = last_json(train(2, config, "--breakdown-steps", "3", "--trace", three))
        _, optimizer = trace_sums(three)
        f.check(result.get("step_breakdown_ms") and all(n == 1 for n in optimizer.values()) and len(optimizer) == 2,
                f"with 3 steps summed the trace holds one step on each rank: {dict(optimizer)}")
        # per step, neither the 3 steps' total nor less: the compute lane (one task at a time) holds most
        # of a step and no more than it (steps 2-4 summed, ms_per_step the median of 3-4: a first,
        # slower step leaves room)
        compute = sum(r["ms"] for r in result.get("step_breakdown_ms") or [] if r["lane"] == "compute")
        f.check(0.45 * result["ms_per_step"] < compute < 1.6 * result["ms_per_step"],
                f"3 steps: the compute lane's rows hold {compute:.1f} ms of a {result['ms_per_step']:.1f} ms step")

        # none asked for, none given; a negative count refused
        result = last_json(train(2, config))
        f.check(result.get("step_breakdown_ms", "absent") is None, "step_breakdown_ms is null without the key")
        one_error(f, train(2, config, "--breakdown-steps", "-1", check=False), "breakdown_steps",
                  "--breakdown-steps -1")
    f.finish("test_train_breakdown")


if __name__ == "__main__":
    main()
