#!/usr/bin/python3
"""Activation recomputation for the routed experts (`recompute: experts`, `layer --recompute
experts`): the forward keeps only the experts' inputs and the backward runs each expert's first GEMM
and activation again. The results must be the bits of the run that keeps everything:

  - the layer's dumps (outputs, input and weight gradients, router gradients) byte for byte, on 2
    and 4 ranks, expert-parallel and PPMoE, fp32 and bf16, GeLU and SwiGLU, capped and dropless
    with the deduplicated dispatch, forward and backward degrees equal and not (the backward's
    chunks then take their rows from other forward chunks);
  - what a pass keeps for its backward shrinks by the saved values and activations it no longer
    holds (`layer --json` held_for_backward_mb);
  - training with a shared expert (whose pre-activation and activation are made again too):
    every logged loss and gradient norm the same bits, the final weights and AdamW moments byte for
    byte (and a checkpoint trained recomputing generates the same text), the MoE layers' held memory lower, expert
    parallel, PPMoE's tp 2, ScMoE with a gated shared expert, and 2 pipeline stages whose
    micro-batches' activations are stashed between their forward and backward;
  - bad values: one clear error.

Run: /usr/bin/python3 tests/cli/test_recompute.py   (needs build/pipemoe)
"""
import csv
import filecmp
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402
from test_train_cli import one_error, tiny_config  # noqa: E402

SMALL = ["--tokens", "256", "--model-dim", "64", "--hidden", "48", "--iters", "1", "--warmup", "0", "--alone-iters", "0"]

# (name, ranks, layer flags, forward degree, backward degree)
LAYERS = [
    ("ep fp32 GeLU top-2 of 8", 2, ["--experts", "8", "--top-k", "2"], 2, 3),
    ("ep bf16 SwiGLU top-4 of 16 dropless, deduplicated, a shared expert", 2,
     ["--experts", "16", "--top-k", "4", "--capacity-factor", "0", "--activation", "swiglu", "--dtype", "bf16",
      "--shared-hidden", "64", "--shared-activation", "swiglu"], 3, 2),
    ("ep bf16 GeLU top-3 of 8", 2, ["--experts", "8", "--top-k", "3", "--dtype", "bf16"], 1, 1),
    ("ep fp32 SwiGLU top-2 of 8, 4 ranks", 4, ["--experts", "8", "--top-k", "2", "--activation", "swiglu"], 2, 2),
    ("ppmoe bf16 GeLU top-2 of 8", 2, ["--strategy", "ppmoe", "--experts", "8", "--top-k", "2", "--dtype", "bf16"], 2, 1),
    ("ppmoe fp32 SwiGLU top-3 of 8 dropless", 2,
     ["--strategy", "ppmoe", "--experts", "8", "--top-k", "3", "--capacity-factor", "0", "--activation", "swiglu"], 1, 3),
]


def same_dumps(a, b):
    """The .npy files of two dump folders (every rank's), byte for byte: the differing names."""
    differ = []
    for root, _, files in os.walk(a):
        for name in files:
            if not name.endswith(".npy"):
                continue
            other = os.path.join(b, os.path.relpath(os.path.join(root, name), a))
            if not os.path.exists(other) or not filecmp.cmp(os.path.join(root, name), other, shallow=False):
                differ.append(os.path.relpath(os.path.join(root, name), a))
    return differ


def train_rows(path):
    keys = ("step", "train_loss", "aux_loss", "val_loss", "grad_norm", "dropped_share")
    return [tuple(r[k] for k in keys) for r in csv.DictReader(open(path))]


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, flags, fwd, bwd in LAYERS:
            dumps, held = {}, {}
            for mode in ("none", "experts"):
                dumps[mode] = os.path.join(tmp, f"{name.replace(' ', '_')}-{mode}")
                mpirun(ranks, ["layer"] + SMALL + flags + ["--degree", fwd, "--degree-bwd", bwd, "--recompute", mode,
                                                          "--dump", dumps[mode]], timeout=120)
                out = mpirun(ranks, ["layer"] + SMALL + flags + ["--degree", fwd, "--degree-bwd", bwd, "--recompute", mode,
                                                                "--json"], timeout=120)
                held[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            meta = json.load(open(os.path.join(dumps["experts"], "meta.json")))
            f.check(meta.get("recompute_experts") is True and held["experts"].get("recompute_experts") is True,
                    f"{name}: the dump and the JSON say recompute_experts")
            npys = sum(1 for _, _, files in os.walk(dumps["none"]) for n in files if n.endswith(".npy"))
            differ = same_dumps(dumps["none"], dumps["experts"])
            f.check(npys >= 10 * ranks and not differ, f"{name}: dumps recomputed differ: {differ[:6]} ({npys} files)")
            a, b = held["none"]["held_for_backward_mb"], held["experts"]["held_for_backward_mb"]
            f.check(b < 0.8 * a, f"{name}: held for the backward {a:.2f} MB, recomputing {b:.2f} MB")
            print(f"ok: {name}, degrees {fwd}/{bwd}: {npys} dumps the same bits recomputed; held for the backward "
                  f"{a:.2f} -> {b:.2f} MB", flush=True)

        # training, expert parallel and PPMoE: the same curve, less held
        config = tiny_config(tmp, max_steps=6, eval_every=3, expert_activation="swiglu", dtype="bf16", top_k=3,
                             experts=8, shared_expert_hidden=24, shared_expert_activation="swiglu")
        for label, ranks, sets in [("ep", 2, []), ("ppmoe tp 2", 2, ["tp=2"]),
                                   ("scmoe with a gated GeLU shared expert", 2,
                                    ["arch=scmoe", "coef_gate=true", "shared_expert_activation=gelu"]),
                                   ("2 pipeline stages x dp 2, 4 micro-batches in flight", 4, ["pp=2", "micro_batches=4"])]:
            logs, results = {}, {}
            for mode in ("none", "experts"):
                logs[mode] = os.path.join(tmp, f"train-{label.replace(' ', '')}-{mode}.csv")
                save = os.path.join(tmp, f"ck-{label.replace(' ', '')}-{mode}")
                args = ["train", "--config", config, "--set", f"save={save}", "--set", f"log_csv={logs[mode]}", "--set",
                        f"recompute={mode}"]
                for s in sets:
                    args += ["--set", s]
                out = mpirun(ranks, args, timeout=300)
                results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                said = "(recompute experts: their inputs only" in out.stderr
                f.check(said == (mode == "experts"), f"train {label}, recompute {mode}: the memory line says so or not")
            rows = train_rows(logs["none"])
            f.check(len(rows) == 6 and rows == train_rows(logs["experts"]),
                    f"train {label}: losses and gradient norms with recompute: {train_rows(logs['experts'])[:2]} vs {rows[:2]}")
            a, b = results["none"]["moe_held_for_backward_mb"], results["experts"]["moe_held_for_backward_mb"]
            f.check(b < 0.8 * a, f"train {label}: MoE layers held {a:.3f} MB, recomputing {b:.3f} MB")
            checkpoints = [os.path.join(tmp, f"ck-{label.replace(' ', '')}-{mode}", "step-000006") for mode in ("none", "experts")]
            for part in ("model.safetensors", "optimizer.safetensors"):
                f.check(filecmp.cmp(*(os.path.join(c, part) for c in checkpoints), shallow=False),
                        f"train {label}: the final {part} byte for byte")
            if label == "ep":  # a checkpoint trained recomputing generates as any other
                texts = [mpirun(1, ["generate", "--checkpoint", os.path.dirname(c), "--prompt", "The jury said", "--tokens",
                                    "12", "--temperature", "0"], timeout=120).stdout for c in checkpoints]
                f.check(texts[0] == texts[1] and len(texts[0]) > 20, f"generate from both checkpoints: {texts}")
            print(f"ok: train {label}: the same losses and gradient norms, the MoE layers holding {a:.3f} -> {b:.3f} MB",
                  flush=True)

        one_error(f, mpirun(2, ["layer"] + SMALL + ["--recompute", "all"], check=False), "--recompute",
                  "an unknown --recompute")
        one_error(f, mpirun(2, ["train", "--config", config, "--set", "recompute=everything"], check=False), "recompute",
                  "an unknown recompute in the configuration")
    f.finish("test_recompute")


if __name__ == "__main__":
    main()
