#!/usr/bin/python3
"""A rank that dies (SIGKILL) or stops (SIGSTOP) mid-training ends the job on every rank within 30
s (a stopped rank: within the heartbeat timeout, the default 15 s, or 5 s where a case sets it), with
a message naming the rank, on 2 and 4 ranks, rank 0 included; and the heartbeat that
finds it never takes a healthy rank for a dead one (ranks that wait long in a collective while
rank 0 trains the tokenizer, ranks that finish at different times, a 3 s heartbeat timeout).

Run: /usr/bin/python3 tests/cli/test_faults.py   (needs build/pipemoe)
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import BINARY, Failures, mpi_env, mpirun  # noqa: E402
from test_train_cli import TINY, write_text  # noqa: E402


def descends_from(pid, ancestor):
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def rank_pids(job):
    """rank -> pid of the pipemoe ranks started by process `job`, from their environment."""
    out = {}
    for pid in subprocess.run(["pgrep", "-f", BINARY + " "], capture_output=True, text=True).stdout.split():
        if not descends_from(int(pid), job):
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = int(pid)
    return out


def fault(ranks, victim, sig, config, heartbeat=None):
    """Starts a long training run (with --heartbeat-timeout `heartbeat` if given), sends sig to rank
    victim once every rank trains; returns (seconds from the signal to the job's end, exit code, stderr)."""
    cmd = ["timeout", "--kill-after=5", "120", "mpirun", "-q", "--oversubscribe", "-np", str(ranks), BINARY] + (
        ["--heartbeat-timeout", str(heartbeat)] if heartbeat else []) + ["train", "--config", config, "--set", "save="]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env())
    deadline = time.time() + 60
    pids = {}
    while time.time() < deadline and len(pids) < ranks:
        time.sleep(0.5)
        pids = rank_pids(proc.pid)
    time.sleep(4)  # past setup: in the training loop
    sent = time.time()
    os.kill(pids[victim], sig)
    _, err = proc.communicate()
    took = time.time() - sent
    if sig == signal.SIGSTOP:
        try:
            os.kill(pids[victim], signal.SIGKILL)  # if mpirun left it stopped
        except ProcessLookupError:
            pass
    return took, proc.returncode, err


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        config = os.path.join(tmp, "long.json")
        json.dump(dict(TINY, data=text, max_steps=1000000, log_every=100000, eval_every=1000000), open(config, "w"))
        # a stopped rank is found by the heartbeat's timeout: the default (15 s) once, 5 s once
        for ranks, victim, sig, heartbeat in [(2, 1, signal.SIGSTOP, 5), (2, 0, signal.SIGKILL, None),
                                              (4, 0, signal.SIGSTOP, None), (4, 3, signal.SIGKILL, None)]:
            name = f"{ranks} ranks, {signal.Signals(sig).name} to rank {victim}" + (
                f", a {heartbeat} s heartbeat" if heartbeat else "")
            took, code, err = fault(ranks, victim, sig, config, heartbeat)
            named = [l for l in err.splitlines() if ("pipemoe: error" in l or "mpirun" in l) and
                     (f"rank {victim} " in l or f"process rank {victim} " in l)]
            f.check(code not in (0, 124), f"{name}: exit {code} (124: the time limit, not the job, ended it)")
            f.check(took < 30, f"{name}: the job took {took:.1f} s to end")
            f.check(bool(named), f"{name}: no line names rank {victim}: {err[-600:]}")
            print(f"ok: {name}: ended in {took:.1f} s, exit {code}: {named[0] if named else err[-300:]}", flush=True)

        # healthy ranks are never taken for dead: a 3 s heartbeat through a run where ranks wait
        # for rank 0's tokenizer and finish at different times
        short = os.path.join(tmp, "short.json")
        json.dump(dict(TINY, data=text), open(short, "w"))
        for ranks in (2, 4):
            proc = mpirun(ranks, ["--heartbeat-timeout", 3, "train", "--config", short, "--set", "save="],
                          timeout=180, check=False)
            f.check(proc.returncode == 0 and "ending the job" not in proc.stderr,
                    f"{ranks} healthy ranks with a 3 s heartbeat: exit {proc.returncode}: {proc.stderr[-400:]}")
        print("ok: healthy ranks with a 3 s heartbeat finish normally", flush=True)
    f.finish("test_faults")


if __name__ == "__main__":
    main()
