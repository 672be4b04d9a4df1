#!/usr/bin/python3
"""`train --breakdown-steps N` (config key breakdown_steps): where a step goes, each task's time per
step summed over layers and chunks, on the rank that spent the most on it, printed at the end and
in the final JSON (`step_breakdown_ms`). Checked against the Chrome trace of the same step (one
step summed, `--trace` of the last step: every (pass, task) the same ms and number of tasks, the
largest over the ranks), per step when it sums three (each task's count per step the one step's),
with the trace file still holding one step; none without the key; a negative count refused with
one clear line.

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
from test_train_cli import one_error, tiny_config, train  # noqa: E402


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trace_sums(path):
    """(pass, task without its chunk) -> [ms, tasks] of the trace, each the largest over the ranks;
    and each rank's count of optimizer spans (one per traced step)."""
    t = json.load(open(path))
    events = t["traceEvents"] if isinstance(t, dict) else t
    per_rank = collections.defaultdict(lambda: [0.0, 0])
    optimizer = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        key = (e["pid"], e["cat"], e["name"].split("[")[0])
        per_rank[key][0] += e["dur"] / 1000
        per_rank[key][1] += 1
        optimizer[e["pid"]] += e["name"] == "optimizer"
    largest = {}
    for (_, cat, name), (ms, calls) in per_rank.items():
        old = largest.get((cat, name), [0.0, 0])
        largest[(cat, name)] = [max(old[0], ms), max(old[1], calls)]
    return largest, optimizer


def summed(rows):
    """(pass, task) -> [ms, tasks], the lanes added (the trace's events carry lane ids, not names)."""
    out = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        out[(r["pass"], r["task"])][0] += r["ms"]
        out[(r["pass"], r["task"])][1] += r["calls"]
    return out


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(tmp, max_steps=4, eval_every=100)

        # one step summed: the breakdown of the traced step, task by task
        trace = os.path.join(tmp, "step.json")
        result = last_json(train(2, config, "--breakdown-steps", "1", "--trace", trace))
        rows = result.get("step_breakdown_ms") or []
        for r in rows:
            f.check("[" not in r["task"] and r["ms"] >= 0 and r["calls"] >= 1, f"a row named with its chunk, or empty: {r}")
        mine = summed(rows)
        for key in [("forward", "attention"), ("backward", "attention_bwd"), ("forward", "expert"),
                    ("backward", "expert_wgrad"), ("backward", "optimizer")]:
            f.check(key in mine, f"no row for {key}: {sorted(mine)}")
        traced, optimizer = trace_sums(trace)
        f.check(set(mine) == set(traced), f"the breakdown's tasks {sorted(mine)} against the trace's {sorted(traced)}")
        far = [(k, mine[k], traced[k]) for k in mine if k in traced and
               (abs(mine[k][0] - traced[k][0]) > 1e-3 + 1e-3 * traced[k][0] or mine[k][1] != traced[k][1])]
        f.check(not far, f"tasks whose ms or count differ from the trace's: {far[:5]}")
        if not far:
            print(f"ok: {len(rows)} rows, each the trace's ms and tasks of the same step", flush=True)

        # three steps summed: the trace file still holds one
        three = os.path.join(tmp, "three.json")
        result = last_json(train(2, config, "--breakdown-steps", "3", "--trace", three))
        _, optimizer = trace_sums(three)
        f.check(result.get("step_breakdown_ms") and all(n == 1 for n in optimizer.values()) and len(optimizer) == 2,
                f"with 3 steps summed the trace holds one step on each rank: {dict(optimizer)}")
        # per step, neither the 3 steps' total nor less: every step runs the same tasks, so each
        # task's count per step is the one step's
        per_step = {k: v[1] for k, v in summed(result.get("step_breakdown_ms") or []).items()}
        one_step = {k: v[1] for k, v in mine.items()}
        f.check(per_step == one_step, f"3 steps: tasks per step {per_step} against one step's {one_step}")

        # none asked for, none given; a negative count refused
        result = last_json(train(2, config))
        f.check(result.get("step_breakdown_ms", "absent") is None, "step_breakdown_ms is null without the key")
        one_error(f, train(2, config, "--breakdown-steps", "-1", check=False), "breakdown_steps",
                  "--breakdown-steps -1")
    f.finish("test_train_breakdown")


if __name__ == "__main__":
    main()
