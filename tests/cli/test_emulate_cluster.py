#!/usr/bin/python3
"""scripts/emulate-cluster: a real 2-host run over emulated links, and its failure modes (a failing
command, a timeout, an unknown host, bad arguments): a clear error, a non-zero exit, no hang, and
no namespace, link or host entry left behind.

Needs root and network namespaces; where they are not available it exits with code 77, which
ctest reports as SKIPPED (not passed).
Run: /usr/bin/python3 tests/cli/test_emulate_cluster.py   (needs build/pipemoe)
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import BINARY, ROOT, Failures, mpi_env  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "emulate-cluster")


def state():
    """What the script creates: namespaces, links and /etc/hosts lines of ours."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    hosts = open("/etc/hosts").read()
    return ([l.split()[0] for l in ns.splitlines() if l.startswith("pm")],
            [l.split(":")[1].strip().split("@")[0] for l in links.splitlines() if ": pm" in l],
            [l for l in hosts.splitlines() if "emulate-cluster" in l])


def run(args, timeout=180):
    proc = subprocess.run(["timeout", "--kill-after=5", str(timeout), SCRIPT] + [str(a) for a in args],
                          capture_output=True, text=True, env=mpi_env())
    if proc.returncode == 124 and "did not finish" not in proc.stderr:
        raise AssertionError(f"hung: {args}")
    return proc


def main():
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "add", "pm-probe"], capture_output=True).returncode:
        print("test_emulate_cluster: skipped (needs root and network namespaces)")
        sys.exit(77)
    subprocess.run(["ip", "netns", "del", "pm-probe"])
    f = Failures()
    before = state()

    layer = ["mpirun", "-q", "-np", 2, BINARY, "layer", "--tokens", 256, "--model-dim", 64, "--hidden", 64,
             "--experts", 4, "--iters", 2, "--warmup", 1, "--alone-iters", 1, "--degree", 2, "--json"]
    ok = run(["--hosts", 2, "--rate", "500mbit", "--"] + layer)
    f.check(ok.returncode == 0, f"layer across 2 emulated hosts failed: {ok.stderr[-2000:]}")
    if ok.returncode == 0:
        d = json.loads(ok.stdout.strip().splitlines()[-1])
        f.check(d["world_size"] == 2 and d["comm_ms"] > 0, "2 ranks, communication timed")
        print(f"ok: layer across 2 emulated hosts at 500mbit: forward {d['forward_ms']:.1f} ms", flush=True)
    f.check(state() == before, f"left behind after a run: {state()}")

    cases = [
        (["--hosts", 2, "--rate", "1gbit", "--", "false"], 1, "", "a failing command"),
        (["--hosts", 2, "--rate", "1gbit", "--timeout", 2, "--", "sleep", 30], 124, "did not finish", "a timeout"),
        (["--hosts", 2, "--rate", "1gbit", "--", "mpirun", "-q", "-np", 1, "--host", "nosuchhost", "hostname"],
         None, "", "an unknown host"),
        (["--hosts", 0, "--rate", "1gbit", "--", "true"], 1, "--hosts", "zero hosts"),
        (["--hosts", 2, "--rate", "fast", "--", "true"], 1, "--rate", "a bad rate"),
        (["--hosts", 2, "--rate", "1gbit"], 2, "usage", "no command"),
    ]
    for args, code, word, name in cases:
        proc = run(args, timeout=120)
        f.check(proc.returncode != 0 and (code is None or proc.returncode == code),
                f"{name}: exit {proc.returncode}, expected {code or 'non-zero'}")
        f.check(word in proc.stderr, f"{name}: '{word}' not in {proc.stderr[-500:]}")
        f.check(state() == before, f"{name}: left behind {state()}")
        print(f"ok: {name} -> exit {proc.returncode}", flush=True)
    f.finish("test_emulate_cluster")


if __name__ == "__main__":
    main()
