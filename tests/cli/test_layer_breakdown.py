#!/usr/bin/python3
"""`layer --breakdown` and the `tasks_ms` rows of `layer --json`: each task's time per pass, summed
over the pipeline's chunks. Checked against what the same run measures another way: on one rank
the expert tasks' rows add up to `expert_ms` (the executor's busy time of the expert cost classes;
with 2 passes a median is a mean, so the two sums agree to rounding), and a lane that runs one task
at a time (compute) never holds more than its pass; at degree 2 each name appears once, without
its chunk, with the number of its tasks a pass (2 chunks, or 1). On 2 ranks under mpirun the text
table lists the same tasks.

Run: /usr/bin/python3 tests/cli/test_layer_breakdown.py   (needs build/pipemoe)
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402

LAYER = ["layer", "--tokens", "256", "--model-dim", "32", "--hidden", "64", "--experts", "4", "--top-k", "2",
         "--degree", "2", "--iters", "2", "--warmup", "1", "--alone-iters", "0"]


def rows_of(result):
    return {(r["pass"], r["task"]): r for r in result["tasks_ms"]}


def main():
    failures = Failures()

    one = mpirun(1, LAYER + ["--json"], timeout=120, check=False)
    failures.check(one.returncode == 0, f"1 rank: exit {one.returncode}: {one.stderr.strip()[-300:]}")
    if one.returncode == 0:
        before = len(failures.items)
        result = json.loads(one.stdout.strip().splitlines()[-1])
        rows = rows_of(result)
        failures.check(len(rows) == len(result["tasks_ms"]), "a (pass, task) appears twice")
        for (pass_, task), r in rows.items():
            failures.check("[" not in task, f"{task}: the chunk is in the name")
            failures.check(r["ms"] >= 0, f"{pass_} {task}: {r['ms']} ms")
        for key in [("forward", "gate"), ("forward", "dispatch"), ("forward", "expert"), ("forward", "combine"),
                    ("forward", "unpack"), ("backward", "expert_dgrad"), ("backward", "expert_wgrad"),
                    ("backward", "unpack_grad")]:
            failures.check(key in rows, f"no row for {key}")
        # how many of each ran per pass: chunks at degree 2, one of the rest
        calls = {k: rows[k]["calls"] for k in rows}
        for key, want in [(("forward", "expert"), 2), (("forward", "dispatch"), 2), (("forward", "combine"), 2),
                          (("forward", "gate"), 1), (("backward", "expert_dgrad"), 2), (("backward", "expert_wgrad"), 1)]:
            failures.check(calls.get(key) == want, f"{key}: {calls.get(key)} tasks a pass, expected {want}")
        experts = sum(rows[k]["ms"] for k in [("forward", "expert"), ("backward", "expert_dgrad"),
                                              ("backward", "expert_wgrad")] if k in rows)
        failures.check(abs(experts - result["expert_ms"]) <= 1e-6 + 1e-3 * result["expert_ms"],
                       f"the expert tasks' rows sum to {experts:.4f} ms, expert_ms is {result['expert_ms']:.4f}")
        for pass_, wall in (("forward", result["forward_ms"]), ("backward", result["backward_ms"])):
            compute = sum(r["ms"] for (p, _), r in rows.items() if p == pass_ and r["lane"] == "compute")
            failures.check(0 < compute <= wall * 1.01 + 0.01,
                           f"{pass_}: the compute lane's tasks hold {compute:.3f} ms of a {wall:.3f} ms pass")
        if len(failures.items) == before:
            print(f"ok: 1 rank, {len(rows)} rows; expert tasks {experts:.3f} ms = expert_ms {result['expert_ms']:.3f}",
                  flush=True)

    two = mpirun(2, LAYER + ["--breakdown"], timeout=120, check=False)
    failures.check(two.returncode == 0, f"2 ranks: exit {two.returncode}: {two.stderr.strip()[-300:]}")
    if two.returncode == 0:
        lines = two.stdout.splitlines()
        start = [i for i, line in enumerate(lines) if line.startswith("where a pass goes")]
        failures.check(len(start) == 1, "no 'where a pass goes' table")
        if start:
            before = len(failures.items)
            table = [line.split() for line in lines[start[0] + 2:] if line.startswith("  ")]
            tasks = {(t[0], t[2]) for t in table if len(t) == 6}
            for key in [("forward", "expert"), ("forward", "dispatch"), ("backward", "expert_wgrad"),
                        ("backward", "grad_combine")]:
                failures.check(key in tasks, f"2 ranks: no row for {key} in the table")
            if len(failures.items) == before:
                print(f"ok: 2 ranks, {len(table)} rows in the table", flush=True)
    failures.finish("test_layer_breakdown")


if __name__ == "__main__":
    main()
