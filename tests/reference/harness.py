"""Shared helpers for the tests that run the pipemoe binary under mpirun and check its output.

Every launch runs under a time limit so that a hung rank fails the test instead of hanging CI.
"""
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("PIPEMOE_BIN", os.path.join(ROOT, "build", "pipemoe"))


def mpi_env():
    env = dict(os.environ)
    # Tests run as root in CI containers; OpenMPI refuses that unless told it is fine.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PIPEMOE_THREADS", "1")
    # the messaging layer Open MPI picks on one machine anyway (ob1), named so that MPI_Init skips
    # probing the others: 0.2 s of every launch (PSM2's probe alone spins 0.1 s)
    env.setdefault("OMPI_MCA_pml", "ob1")
    return env


# Sanitizer builds run several times slower (scripts/sanitize sets this to 4): every time limit
# stretches with them, so that a slow but healthy run is not taken for a hung one.
TIMEOUT_SCALE = float(os.environ.get("PIPEMOE_TIMEOUT_SCALE", "1"))

# Set by a test's --inprocess flag: ranks run as threads of one pipemoe process, no mpirun.
IN_PROCESS = "--inprocess" in sys.argv


def mpirun(ranks, args, timeout=120, check=True, env=None):
    """Runs `mpirun -np ranks pipemoe args...` (or, in-process, `pipemoe --ranks-in-process ranks
    args...`), with `env` added to the environment; returns the CompletedProcess."""
    timeout = int(timeout * TIMEOUT_SCALE)
    if IN_PROCESS:
        cmd = ["timeout", "--kill-after=5", str(timeout), BINARY, "--ranks-in-process", str(ranks)]
    else:
        cmd = ["timeout", "--kill-after=5", str(timeout), "mpirun", "-q", "--oversubscribe", "-np", str(ranks), BINARY]
    cmd += [str(a) for a in args]
    # Each launch keeps Open MPI's session folders in a tree of its own: launches running at once
    # (mpirun_async) shared /tmp's and now and then raced on it, one removing the folder another was
    # creating ("ORTE_ERROR_LOG: Error in file .../session_dir.c", exit 1 before pipemoe started).
    with tempfile.TemporaryDirectory(prefix="pipemoe-mpi-") as session:
        run_env = dict(mpi_env(), **(env or {}))
        if not IN_PROCESS:
            run_env.setdefault("OMPI_MCA_orte_tmpdir_base", session)
        if not check and not IN_PROCESS:
            # A launch expected to fail: after a rank's non-zero exit mpirun signals the job's ranks
            # and sleeps odls_base_sigkill_timeout (1 s) before it kills them, also when they have
            # all exited already. None of ours handles SIGTERM but serve, which these launches do
            # not stop by a signal: 1 s saved per launch, nothing else changed.
            run_env.setdefault("OMPI_MCA_odls_base_sigkill_timeout", "0")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
    if proc.returncode == 124:
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


# A small launch is mostly waiting (mpirun's start-up: 0.6 s of wall time, 0.2 s of CPU), so a
# test that makes hundreds of them runs a few at once: mpirun_async. Sanitizer builds (slow, and
# their time limits stretched) run one at a time.
LAUNCHES_AT_ONCE = int(os.environ.get("PIPEMOE_TEST_LAUNCHES", "4" if TIMEOUT_SCALE == 1 else "1"))
_launcher = ThreadPoolExecutor(LAUNCHES_AT_ONCE)


def mpirun_async(ranks, args, **kwargs):
    """mpirun in the background: returns a future whose result() is mpirun's (or raises its error)."""
    return _launcher.submit(mpirun, ranks, args, **kwargs)


class Failures:
    """Collects failed checks and reports them all at the end."""

    def __init__(self):
        self.items = []
        self.checks = 0

    def check(self, ok, message):
        """Records a failure when not ok; returns ok, so that a caller prints its "ok" line only then."""
        self.checks += 1
        if not ok:
            self.items.append(message)
            print("FAIL:", message, flush=True)
        return bool(ok)

    def finish(self, name):
        if self.items:
            print(f"{name}: {len(self.items)} of {self.checks} checks failed", flush=True)
            sys.exit(1)
        print(f"{name}: all {self.checks} checks passed", flush=True)


def read_safetensors(path):
    """A pipemoe checkpoint's float32 tensors: {name: numpy array of its shape}."""
    import json
    import struct

    import numpy as np
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        data = f.read()
    return {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtype=np.float32).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__"}
