#!/usr/bin/python3
"""Walks the README as a new user would: every command in its ```sh blocks, run from another
folder (the repository's paths given from there), as the current user (root in CI) without the
Open MPI root permission in the environment (the commands must carry their own), each under a
time limit; every one must succeed.

Run: /usr/bin/python3 tests/cli/test_readme.py   (needs build/pipemoe)

Not run here, and why: `scripts/test` (this suite itself) and `scripts/demo` (the 300-step main
job, minutes; CI's clean-clone run and docs/BENCHMARKS.md cover it). The emulated cluster needs
root and network namespaces: without them that command is reported as not run. To keep the suite
short, a few long commands get extra flags appended, listed in QUICK (the commands themselves stay
as printed), and `train` saves into a temporary folder instead of the repository's runs/.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import ROOT, Failures  # noqa: E402

NOT_RUN = {"scripts/demo": "the main job itself (minutes)", "scripts/test": "this test suite itself"}
# flags appended to keep the suite short, per command
QUICK = {
    "train": ["--max-steps", "3", "--set", "eval_every=3", "--set", "eval_batches=1", "--set", "log_every=1"],
    "profile": ["--quick", "--iters", "1", "--degrees", "1,2"],
    "emulated layer": ["--iters", "2"],
}
REPO_PATHS = ("build/", "configs/", "scripts/", "data/", "bench/")


def readme_commands():
    """Every command of the ```sh blocks, as (block number, command)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for number, block in enumerate(re.findall(r"```sh\n(.*?)```", text, re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append((number, line))
    return commands


def stop_background(background, f):
    """`kill %1` (or the block's end): SIGTERM to the server started with `&`; it must exit 0."""
    for command, proc in background:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        f.check(proc.returncode == 0, f"README background command ended with exit {proc.returncode}: {command}")
        print(f"{'ok' if proc.returncode == 0 else 'FAILED'}: {command} (stopped)", flush=True)
    background.clear()


def can_emulate():
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "add", "pm-readme-probe"], capture_output=True)
    if probe.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", "pm-readme-probe"], capture_output=True)
    return True


def prepare(command, runs):
    """The command as a user in another folder types it, plus QUICK flags; its kind."""
    args = shlex.split(command)
    out = []
    for a in args:
        if a == "build/pipemoe" and os.environ.get("PIPEMOE_BIN"):
            out.append(os.environ["PIPEMOE_BIN"])  # the binary under test (scripts/sanitize: build-asan's)
        elif a.startswith("runs/"):
            out.append(os.path.join(runs, a[len("runs/"):]))
        elif a.startswith(REPO_PATHS):
            out.append(os.path.join(ROOT, a))
        else:
            out.append(a)
    kind = "emulated layer" if "emulate-cluster" in command else next(
        (a for a in args if a in ("train", "profile", "plan", "layer", "generate", "serve")), args[0])
    out += QUICK.get(kind, [])
    if kind == "train":  # where the configuration saves (configs/X.json: runs/X), under runs
        config = args[args.index("--config") + 1] if "--config" in args else "configs/demo.json"
        out += ["--set", f"save={os.path.join(runs, os.path.splitext(os.path.basename(config))[0])}"]
    return out, kind


def main():
    f = Failures()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
    env.setdefault("PIPEMOE_THREADS", "1")
    commands = readme_commands()
    f.check(len(commands) >= 8, f"the README has its commands ({len(commands)} found)")
    emulate = can_emulate()
    with tempfile.TemporaryDirectory() as elsewhere:
        runs = os.path.join(elsewhere, "runs")
        background, block = [], None  # commands ending in `&` (a server), stopped at `kill %1` or the block's end
        for number, command in commands:
            if number != block:
                stop_background(background, f)
                block = number
            if command.startswith("kill %"):
                stop_background(background, f)
                continue
            first = command.split()[0]
            if first in NOT_RUN:
                print(f"not run: {command} ({NOT_RUN[first]})", flush=True)
                continue
            if "emulate-cluster" in command and not emulate:
                print(f"not run: {command} (needs root and network namespaces)", flush=True)
                continue
            if command.endswith("&"):
                args, kind = prepare(command[:-1].strip(), runs)
                proc = subprocess.Popen(args, cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        errors="replace", env=env)
                first_line = proc.stdout.readline()  # a server says where it listens once it does
                if not f.check("listening" in first_line, f"README command did not start: {command}\n{first_line}"):
                    proc.wait(timeout=60)
                    print(proc.stderr.read()[-1500:], flush=True)
                background.append((command, proc))
                continue
            args, kind = prepare(command, runs)
            limit = str(int(600 * float(os.environ.get("PIPEMOE_TIMEOUT_SCALE", "1"))))
            proc = subprocess.run(["timeout", "--kill-after=5", limit] + args, cwd=elsewhere, capture_output=True,
                                  text=True, errors="replace", env=env)  # a young model writes any bytes
            ok = proc.returncode == 0
            f.check(ok, f"README command failed (exit {proc.returncode}): {command}\n{proc.stderr[-1500:]}")
            if ok and kind == "generate":
                f.check("The jury said" in proc.stdout, f"generate did not print its text: {proc.stdout[-300:]}")
            if ok and first == "curl":
                f.check('"text"' in proc.stdout or '"content"' in proc.stdout, f"curl got no completion: {proc.stdout[-300:]}")
            print(f"{'ok' if ok else 'FAILED'}: {command}", flush=True)
        stop_background(background, f)
    f.finish("test_readme")


if __name__ == "__main__":
    main()
