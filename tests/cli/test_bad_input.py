#!/usr/bin/python3
"""Bad input to the pipemoe CLI: one clear error line, a non-zero exit on every rank, no hang.

Each case runs under mpirun with a time limit; a hang fails the test.
Run: /usr/bin/python3 tests/cli/test_bad_input.py   (needs build/pipemoe)
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun_async  # noqa: E402

SMALL = ["--tokens", 32, "--model-dim", 16, "--hidden", 16, "--experts", 4, "--iters", 1, "--warmup", 0]


def layer(*overrides):
    """The small layer command with some flags replaced or added."""
    args = list(SMALL)
    it = iter(overrides)
    for flag, value in zip(it, it):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return ["layer"] + args


def cases(tmp):
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    return [
        # (ranks, args, a word the message must contain)
        (3, layer("--experts", 8), "multiple of the number of ranks"),
        (2, layer("--tokens", 0), "tokens"),
        (2, layer("--tokens", -5), "tokens"),
        (1, layer("--model-dim", -4), "model dim"),
        (2, layer("--hidden", 0), "hidden"),
        (2, layer("--experts", 0), "experts"),
        (2, layer("--top-k", 0), "top-k"),
        (1, layer("--top-k", 5), "top-k"),
        (2, layer("--capacity-factor", -1.5), "capacity factor"),
        (2, layer("--route-groups", 3), "route groups must divide the 4 experts"),
        (2, layer("--routed-scaling-factor", -2.5), "routed scaling factor must be positive"),
        (2, layer("--aux-seq-len", 5), "whole sequences of aux seq len"),
        (2, layer("--drop-policy", "random"), "--drop-policy: unknown value 'random' (one of position|probs)"),
        (2, layer("--route-groups", 2, "--route-top-groups", -1), "route top groups"),
        (2, layer("--route-groups", 4, "--route-top-groups", 1, "--top-k", 2), "top-k 2 is more than the 1 experts"),
        (2, layer("--gate-normalize", "maybe"), "gate-normalize"),
        (2, layer("--z-loss-coef", "x"), "z-loss-coef"),
        (2, layer("--activation", "relu"), "--activation: unknown value 'relu' (one of gelu|swiglu)"),
        (2, layer("--dtype", "fp16"), "--dtype: unknown value 'fp16' (one of bf16|fp32)"),
        (2, layer("--router-score", "tanh"), "--router-score: unknown value 'tanh' (one of sigmoid|softmax)"),
        (2, layer("--shared-hidden", -8), "shared-hidden"),
        (2, layer("--shared-hidden", 16, "--shared-activation", "relu"), "shared-activation"),
        (2, layer("--shared-hidden", 16, "--strategy", "ppmoe"), "shared-hidden"),
        (2, layer("--skew", "nan"), "skew"),
        (2, layer("--degree", 1000), "capacity"),
        (2, layer("--degree", 0), "degree"),
        (2, layer("--iters", 0), "iters"),
        (2, layer("--dump", os.path.join(blocker, "dump")), "dump folder"),
        (2, layer("--dump", "/proc/pipemoe-cannot-write"), "dump folder"),
        (2, layer("--tokens", "abc"), "tokens"),
        (2, layer("--no-such-flag", 1), "no-such-flag"),
        (1, ["no-such-command"], "no-such-command"),
        (2, ["--backend", "tpu"] + layer(), "unknown backend 'tpu' (one of cpu|cuda)"),
        (2, ["--bf16-order", "fast"] + layer(), "--bf16-order: fast not in {dot,amx,auto}"),
        (2, ["--bf16-order", "amx", "--backend", "cuda"] + layer(), "--bf16-order amx runs on the CPU backend only"),
    ] + ([] if os.path.exists("/dev/nvidia0") else [
        # no GPU here: the CUDA backend says why it cannot run (no CUDA in the build, or no GPU)
        (2, ["--backend", "cuda"] + layer(), "the CUDA backend cannot run here"),
    ])


def main():
    failures = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(ranks, args, word, mpirun_async(ranks, args, timeout=60, check=False)) for ranks, args, word in cases(tmp)]
        for ranks, args, word, run in runs:
            proc = run.result()
            lines = [l for l in proc.stderr.splitlines() if l.strip()]
            name = f"{ranks} ranks, {' '.join(str(a) for a in args)}"
            failures.check(proc.returncode != 0, f"{name}: exit code 0")
            failures.check(len(lines) == 1, f"{name}: expected one error line, got {len(lines)}: {lines}")
            failures.check(bool(lines) and lines[0].startswith("pipemoe: error") and word in lines[0],
                           f"{name}: message {lines[:1]} should start with 'pipemoe: error' and name '{word}'")
            print(f"ok: {name} -> {lines[0] if lines else ''}", flush=True)
        blocker = os.path.join(tmp, "a-file")
        failures.check(not os.path.exists(os.path.join(blocker, "dump")), "nothing written under a file")
    failures.finish("test_bad_input")


if __name__ == "__main__":
    main()
