#!/usr/bin/python3
"""A checkpoint resumed on another number of ranks: checkpoints hold whole tensors (experts at
their global shape), so a run on 1 or 4 ranks takes its own slices of a 2-rank run's weights and
AdamW moments. Step s trains on the batches of streams (s, 0 .. dp x micro_batches - 1), so with
the same dp x micro_batches the resumed run trains on the same sequences and must continue the
uninterrupted run to float32 rounding (its gradients are summed in another order):

  - a 2-rank run with micro_batches 2 (routing bias balancing on, so the router's bias state
    travels too), checkpointed at step 4, resumed on 4 ranks with micro_batches 1, on 1 rank
    with micro_batches 4, and on 4 ranks as 2 pipeline stages or as PPMoE's tp 2 (dp 2,
    micro_batches 2): the training losses of steps 5-8 and the final weights, experts and
    router biases included, those of the uninterrupted run to float32 rounding; the start says
    what carried over;
  - the same in bf16 with top-k 3 of 8 SwiGLU experts and the deduplicated dispatch, 2 -> 4 ranks;
  - resumed on 4 ranks with micro_batches 2 (twice the batches): a warning that names the
    micro_batches that would keep the sequences, and it trains;
  - on 3 ranks, which the experts do not divide: one clear error, the checkpoint untouched.

Run: /usr/bin/python3 tests/cli/test_resume_other_ranks.py   (needs build/pipemoe)
"""
import csv
import math
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun, read_safetensors  # noqa: E402
from test_train_cli import digest, one_error, tiny_config  # noqa: E402

# float32 rounding over 4 steps of a tiny model: the sums of gradients over ranks and micro-batches
# in another order differ in the last bits, and AdamW carries that along. Measured: the losses
# 1e-9 (fp32) and 3e-7 (bf16) apart relative to the loss; the weights 1.6e-5 and 3.3e-5 relative to
# each tensor's largest value (AdamW divides by sqrt(v): a value whose gradients are near 0 moves
# by up to lr whatever their size, and rounding decides how). A slice of the experts or of AdamW's
# moments put in the wrong place moves the loss of the first resumed step by 1e-2 or more.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 2e-4


def train_losses(path):
    return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(open(path))}


def largest_difference(a, b):
    """The largest |a - b| over every tensor of two model files, relative to the tensor's largest value."""
    ta, tb = read_safetensors(a), read_safetensors(b)
    assert ta.keys() == tb.keys(), f"other tensors: {sorted(ta.keys() ^ tb.keys())}"
    return max(float(np.max(np.abs(ta[n] - tb[n]))) / max(float(np.max(np.abs(ta[n]))), 1e-30) for n in ta)


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        def run(name, ranks, config, *extra, check=True):
            log = os.path.join(tmp, name + ".csv")
            proc = mpirun(ranks, ["train", "--config", config, "--set", f"log_csv={log}"] + list(extra), timeout=300,
                          check=check)
            return proc, log

        # (ranks, micro_batches, other keys): each keeps dp x micro_batches at 4
        models = [("fp32 GeLU, top-2 of 4", {"router_bias_rate": 0.001},
                   [(4, 1, []), (1, 4, []), (4, 2, ["pp=2"]), (4, 2, ["tp=2"])]),
                  ("bf16 SwiGLU, top-3 of 8, deduplicated dispatch",
                   {"dtype": "bf16", "experts": 8, "top_k": 3, "expert_activation": "swiglu", "capacity_factor": 0,
                    "router_bias_rate": 0.001}, [(4, 1, [])])]
        for label, keys, targets in models:
            folder = os.path.join(tmp, label.split()[0])
            os.makedirs(folder)
            config = tiny_config(folder, micro_batches=2, **keys)
            whole = os.path.join(folder, "whole")
            _, whole_log = run("whole", 2, config, "--save", whole, "--set", "save_every=4")
            uninterrupted = train_losses(whole_log)
            for ranks, micro, sets in targets:
                name = f"on{ranks}" + "".join(s.replace("=", "") for s in sets)
                save = os.path.join(folder, name)
                extra = [a for s in sets for a in ("--set", s)]
                proc, log = run(name, ranks, config, "--resume", os.path.join(whole, "step-000004"), "--save",
                                save, "--set", f"micro_batches={micro}", *extra)
                label_to = f"{ranks} ranks" + "".join(f" {s}" for s in sets)
                said = [l for l in proc.stderr.splitlines() if "resuming a checkpoint of 2 ranks" in l]
                f.check(len(said) == 1 and f"on {ranks} " in said[0] and "the same 4 batches of 4 sequences" in said[0]
                        and "warning" not in proc.stderr, f"{label}, 2 -> {label_to}: the start says what carried over: "
                        f"{said} {proc.stderr[-400:]}")
                resumed = train_losses(log)
                f.check(sorted(resumed) == [5, 6, 7, 8], f"{label}, 2 -> {label_to}: steps 5-8 logged: {sorted(resumed)}")
                worst = max(abs(resumed[s] - uninterrupted[s]) / abs(uninterrupted[s]) for s in resumed)
                f.check(worst <= LOSS_TOLERANCE and all(math.isfinite(v) for v in resumed.values()),
                        f"{label}, 2 -> {label_to}: training losses {resumed} against {uninterrupted}")
                weights = largest_difference(os.path.join(whole, "step-000008", "model.safetensors"),
                                             os.path.join(save, "step-000008", "model.safetensors"))
                f.check(weights <= WEIGHT_TOLERANCE, f"{label}, 2 -> {label_to}: final weights {weights:.2e} apart")
                print(f"ok: {label}: 2 ranks (micro_batches 2) -> {label_to} (micro_batches {micro}) at step 4: losses "
                      f"{worst:.1e} and weights {weights:.1e} (relative) from the uninterrupted run", flush=True)

        # twice the batches per step: said, with the micro_batches that would keep them
        config = tiny_config(os.path.join(tmp, "fp32"), micro_batches=2, router_bias_rate=0.001)
        whole = os.path.join(tmp, "fp32", "whole")
        before = digest(whole)
        proc, log = run("more", 4, config, "--resume", os.path.join(whole, "step-000004"), "--set", "save=")
        warned = [l for l in proc.stderr.splitlines() if l.startswith("warning") and "other sequences" in l]
        f.check(len(warned) == 1 and "8 batches of 4" in warned[0] and "--set micro_batches=1 keeps them" in warned[0],
                f"4 ranks with micro_batches 2: a warning naming micro_batches=1: {proc.stderr[-600:]}")
        f.check(sorted(train_losses(log)) == [5, 6, 7, 8] and all(math.isfinite(v) for v in train_losses(log).values()),
                "and it trains steps 5-8")
        print(f"ok: other batches per step are said: {warned[0] if warned else ''}", flush=True)

        # 3 ranks: the 4 experts do not divide
        proc, _ = run("three", 3, config, "--resume", whole, "--set", "save=", "--max-steps", "12", check=False)
        one_error(f, proc, "multiple of the number of ranks", "a 2-rank checkpoint resumed on 3 ranks (4 experts)")
        f.check(digest(whole) == before, "the checkpoint untouched by the runs that resumed it")
    f.finish("test_resume_other_ranks")


if __name__ == "__main__":
    main()
