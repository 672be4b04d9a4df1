#!/usr/bin/python3
"""The global options before the command, in any order and in both spellings (--name VALUE,
--name=VALUE): each takes effect. (`--backend cpu --ranks-in-process 2` once ran one rank: the scan
for --ranks-in-process took the value "cpu" for the command.)

Run: /usr/bin/python3 tests/cli/test_global_options.py   (needs build/pipemoe)
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import BINARY, Failures, mpi_env  # noqa: E402

LAYER = ["layer", "--tokens", "64", "--model-dim", "16", "--hidden", "16", "--experts", "4", "--iters", "1", "--json"]


def main():
    failures = Failures()
    for globals_ in (["--ranks-in-process", "2"],
                     ["--backend", "cpu", "--ranks-in-process", "2"],
                     ["--threads", "1", "--ranks-in-process", "2"],
                     ["--ranks-in-process=2", "--threads=1"],
                     ["--comm-timeout=100", "--heartbeat-timeout", "0", "--ranks-in-process", "2", "--backend=cpu"]):
        name = " ".join(globals_)
        proc = subprocess.run(["timeout", "--kill-after=5", "120", BINARY] + globals_ + LAYER, capture_output=True,
                              text=True, env=mpi_env())
        failures.check(proc.returncode == 0, f"{name}: exit code {proc.returncode}: {proc.stderr.strip()[-300:]}")
        if proc.returncode != 0:
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        failures.check(result["world_size"] == 2, f"{name}: {result['world_size']} ranks, expected 2")
        failures.check(result["backend"].startswith("cpu"), f"{name}: backend {result['backend']}")
        print(f"ok: {name} -> {result['world_size']} ranks, backend {result['backend']}", flush=True)
    # --bf16-order: the order the layer's bf16 GEMMs ran in, said in its JSON (dot without it); auto:
    # amx where the ranks run it on AMX's tiles (bf16_path "amx"), else dot
    amx_here = None
    for globals_, order in ((["--ranks-in-process", "2"], "dot"), (["--bf16-order", "amx", "--ranks-in-process", "2"], "amx"),
                            (["--ranks-in-process=2", "--bf16-order=amx"], "amx"),
                            (["--bf16-order", "auto", "--ranks-in-process", "2"], "auto")):
        name = " ".join(globals_)
        proc = subprocess.run(["timeout", "--kill-after=5", "120", BINARY] + globals_ + LAYER + ["--dtype", "bf16"],
                              capture_output=True, text=True, env=mpi_env())
        if failures.check(proc.returncode == 0, f"{name}: exit code {proc.returncode}: {proc.stderr.strip()[-300:]}"):
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if order == "amx":
                amx_here = result["bf16_path"] == "amx"
            if order == "auto":
                order = "amx" if amx_here else "dot"
            if failures.check(result.get("bf16_order") == order, f"{name}: bf16 order {result.get('bf16_order')}"):
                print(f"ok: {name} -> bf16 GEMMs in the {order} order ({result['bf16_path']})", flush=True)
    failures.finish("test_global_options")


if __name__ == "__main__":
    main()
