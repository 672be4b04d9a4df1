#!/usr/bin/python3
"""The AVX512_BF16 GEMM path in whole runs, on any CPU: with PIPEMOE_EMULATE_BF16_DOT=1 every bf16
GEMM runs that path (its pair words, their packing, its tile loop) with a scalar model of
vdpbf16ps in place of the instruction. The MoE layer (GeLU, SwiGLU with a shared expert, dropless,
PPMoE, pipeline degrees) and a bf16 training run must give the bits of the fp32 kernels' path, the
one CPUs without the instruction take: the promise that a bf16 result does not depend on the CPU.

Run: /usr/bin/python3 tests/cli/test_bf16_dot_emulated.py   (needs build/pipemoe)
"""
import csv
import filecmp
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun, mpirun_async  # noqa: E402

EMULATED = {"PIPEMOE_EMULATE_BF16_DOT": "1"}
LAYER = ["layer", "--tokens", 64, "--model-dim", 48, "--hidden", 80, "--experts", 4, "--top-k", 2, "--dtype", "bf16",
         "--iters", 1, "--warmup", 0, "--seed", 3]
LAYERS = {
    "gelu": [],
    "swiglu, shared expert, dropless, degree 2/3": ["--activation", "swiglu", "--shared-hidden", 40,
                                                    "--capacity-factor", 0, "--degree", 2, "--degree-bwd", 3],
    "ppmoe tp 2": ["--strategy", "ppmoe", "--tp", 2],
}
TINY = {"seq_len": 16, "d_model": 32, "layers": 2, "heads": 2, "mlp_hidden": 48, "moe_every": 2, "experts": 4,
        "top_k": 2, "expert_hidden": 40, "batch_size": 2, "tokenizer_vocab": 280, "max_steps": 3, "eval_every": 3,
        "eval_batches": 1, "log_every": 1, "lr": 0.003, "degree": "1", "dtype": "bf16",
        "expert_activation": "swiglu", "shared_expert_hidden": 24}


# the training log's columns that are numerics (the others are timings)
NUMERICS = ["step", "lr", "train_loss", "aux_loss", "val_loss", "grad_norm", "dropped_share", "moe0_load_max"]


def same_files(a, b, but=()):
    """Every file under a has a byte-identical twin under b and b has no other files, save the
    files named in `but`, which b has too."""
    names = lambda root: sorted(os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns)
    return names(a) == names(b) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
                                        for n in names(a) if n not in but)


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in LAYERS.items():
            dumps = {how: os.path.join(tmp, f"{len(extra)}_{how}") for how in ("fp32 kernels", "emulated")}
            runs = {how: mpirun_async(2, LAYER + extra + ["--dump", dumps[how]],
                                      env=EMULATED if how == "emulated" else None) for how in dumps}
            for run in runs.values():
                run.result()
            paths = {how: json.load(open(os.path.join(dumps[how], "meta.json"))).pop("bf16_path") for how in dumps}
            f.check(paths["emulated"] == "avx512_bf16 (emulated)", f"{name}: the emulated run took {paths['emulated']}")
            f.check(paths["fp32 kernels"] in ("fp32 kernels", "avx512_bf16"), f"{name}: the plain run took {paths}")
            f.check(same_files(dumps["fp32 kernels"], dumps["emulated"], but=["meta.json"]),
                    f"{name}: the AVX512_BF16 path's outputs and gradients differ from the fp32 kernels'")
            print(f"ok: layer {name}: the AVX512_BF16 path (emulated) gives the fp32 kernels' bits", flush=True)

        text = os.path.join(tmp, "text.txt")
        with open(text, "w") as out:
            for i in range(800):
                out.write(f"the model {i % 7} reads line {i} and the experts {i % 3} answer it. ")
        config = os.path.join(tmp, "tiny.json")
        json.dump(dict(TINY, data=text), open(config, "w"))
        folders = {how: os.path.join(tmp, f"train_{how}") for how in ("plain", "emulated")}
        for how, folder in folders.items():
            out = mpirun(2, ["train", "--config", config, "--save", folder], env=EMULATED if how == "emulated" else None,
                         timeout=300)
            if how == "emulated":
                f.check("avx512_bf16 (emulated)" in out.stderr, "the emulated training says which path its GEMMs took")
        steps = {how: os.path.join(folder, f"step-{TINY['max_steps']:06d}") for how, folder in folders.items()}
        state = {how: dict(json.load(open(os.path.join(step, "state.json"))), config=None) for how, step in steps.items()}
        f.check(same_files(steps["plain"], steps["emulated"], but=["state.json"]) and state["plain"] == state["emulated"],
                "bf16 training on the AVX512_BF16 path (emulated): the checkpoint differs from the fp32 kernels'")
        logged = {how: [{k: row[k] for k in NUMERICS} for row in csv.DictReader(open(os.path.join(folder, "log.csv")))]
                  for how, folder in folders.items()}
        f.check(len(logged["plain"]) == TINY["max_steps"] and logged["plain"] == logged["emulated"],
                f"bf16 training on the AVX512_BF16 path (emulated): logged losses differ: {logged}")
        print("ok: 3 bf16 training steps (SwiGLU, shared expert) give the same checkpoint and log", flush=True)
    f.finish("test_bf16_dot_emulated")


if __name__ == "__main__":
    main()
