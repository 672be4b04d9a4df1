#!/usr/bin/python3
"""The deduplicated dispatch (`--dedup-dispatch`, config `dedup_dispatch`): a rank is sent each
token once a pass, however many of its experts the token chose; the backward's dispatch too (dy in
float32, scaled on the expert side) where the shape makes that fewer bytes. Under mpirun on 3
ranks (top-4 of 12 experts: a token often chooses two experts of one rank; the backward's
deduplicated in fp32 only; top-8 of 12: in bf16 too), at degrees 1 and 3, fp32 and bf16, dropless
and with a capacity: every tensor `layer --dump` writes (outputs, input and weight gradients,
routing) is byte for byte what it is with a row sent per choice; `layer --json` says what each
dispatch sent (fewer rows than choices, and as many without deduplication; top-1 has nothing to
leave out); a value that is not true or false is refused, on `layer` and in a configuration. (PyTorch checks the numbers themselves: tests/reference/test_moe_layer.py runs
with the default, deduplicated.)

Run: /usr/bin/python3 tests/cli/test_dedup_dispatch.py   (needs build/pipemoe)
"""
import filecmp
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun, mpirun_async  # noqa: E402

RANKS = 3
LAYER = ["layer", "--tokens", "96", "--model-dim", "16", "--hidden", "24", "--experts", "12", "--iters", "1",
         "--warmup", "0", "--alone-iters", "0"]


def dumped_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                  if f != "meta.json")


def main():
    failures = Failures()
    with tempfile.TemporaryDirectory(prefix="pipemoe-dedup-") as tmp:
        # (dtype, top-k): whether the backward's dispatch is deduplicated too (its float32 rows once
        # per token take fewer bytes than the scaled rows: unique_rows.h scaled_dispatch_pays)
        kinds = {("fp32", "4"): True, ("bf16", "4"): False, ("bf16", "8"): True}
        cases = [(dtype, k, f, degree) for dtype, k in kinds for f in ("0", "1.25") for degree in ("1", "3")]
        dumps, reports = {}, {}
        for dtype, k, f, degree in cases:
            for dedup in ("true", "false"):
                out = os.path.join(tmp, f"{dtype}-{k}-{f}-{degree}-{dedup}")
                args = LAYER + ["--top-k", k, "--capacity-factor", f, "--dtype", dtype, "--degree", degree,
                                "--dedup-dispatch", dedup]
                dumps[(dtype, k, f, degree, dedup)] = (out, mpirun_async(RANKS, args + ["--dump", out], timeout=120,
                                                                         check=False))
                reports[(dtype, k, f, degree, dedup)] = mpirun_async(RANKS, args + ["--json"], timeout=120, check=False)
        for (dtype, k, f, degree, dedup), (out, future) in dumps.items():
            proc = future.result()
            failures.check(proc.returncode == 0, f"{dtype}, top-{k}, capacity factor {f}, degree {degree}, dedup {dedup}: "
                                                 f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        for (dtype, k, f, degree, dedup), future in reports.items():
            proc = future.result()
            where = f"{dtype}, top-{k}, capacity factor {f}, degree {degree}, dedup {dedup}"
            if not failures.check(proc.returncode == 0, f"{where}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}"):
                continue
            j = json.loads(proc.stdout.strip().splitlines()[-1])
            backward = dedup == "true" and kinds[(dtype, k)]
            failures.check(j["dedup_dispatch"] == (dedup == "true"), f"{where}: dedup_dispatch {j['dedup_dispatch']}")
            failures.check(j["dedup_grad_dispatch"] == backward, f"{where}: dedup_grad_dispatch {j['dedup_grad_dispatch']}")
            for what, deduplicated in (("dispatch", dedup == "true"), ("grad_dispatch", backward)):
                sent, choices = j[f"{what}_rows_sent"], j[f"{what}_choices_sent"]
                failures.check(choices > 0, f"{where}: {what}: no choice sent to another rank")
                if deduplicated:
                    failures.check(sent < choices, f"{where}: {what}: {sent} rows for {choices} choices: "
                                                   f"no token sent once for two")
                else:
                    failures.check(sent == choices, f"{where}: {what}: {sent} rows for {choices} choices "
                                                    f"without deduplication")
        for dtype, k, f, degree in cases:
            a, b = dumps[(dtype, k, f, degree, "true")][0], dumps[(dtype, k, f, degree, "false")][0]
            if not (os.path.isdir(a) and os.path.isdir(b)):
                continue
            files = dumped_files(a)
            failures.check(len(files) > 10 and files == dumped_files(b), f"{dtype} {k} {f} {degree}: dumps list {files}")
            _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
            failures.check(not mismatch and not errors, f"{dtype}, top-{k}, capacity factor {f}, degree {degree}: "
                                                        f"deduplicated, {mismatch + errors} differ")

        # top-1: nothing to leave out, and the JSON says it is not deduplicated
        one = mpirun(RANKS, LAYER + ["--top-k", "1", "--json"], timeout=120, check=False)
        if failures.check(one.returncode == 0, f"top-1: exit {one.returncode}: {one.stderr.strip()[-300:]}"):
            j = json.loads(one.stdout.strip().splitlines()[-1])
            failures.check(not j["dedup_dispatch"] and j["dispatch_rows_sent"] == j["dispatch_choices_sent"],
                           f"top-1: {j['dispatch_rows_sent']} rows, {j['dispatch_choices_sent']} choices, "
                           f"dedup {j['dedup_dispatch']}")

        bad = mpirun(1, LAYER + ["--top-k", "2", "--dedup-dispatch", "maybe"], timeout=60, check=False)
        failures.check(bad.returncode != 0 and "--dedup-dispatch" in bad.stderr and "maybe" in bad.stderr,
                       f"--dedup-dispatch maybe: exit {bad.returncode}, {bad.stderr.strip()[-200:]}")
        config = os.path.join(tmp, "bad.json")
        with open(config, "w") as fh:
            json.dump({"dedup_dispatch": "yes"}, fh)
        bad = mpirun(1, ["train", "--config", config, "--max-steps", "1"], timeout=60, check=False)
        failures.check(bad.returncode != 0 and "dedup_dispatch" in bad.stderr,
                       f"dedup_dispatch \"yes\" in a configuration: exit {bad.returncode}, {bad.stderr.strip()[-200:]}")
    failures.finish("test_dedup_dispatch")


if __name__ == "__main__":
    main()
