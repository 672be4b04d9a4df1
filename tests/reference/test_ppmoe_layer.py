#!/usr/bin/python3
"""The PPMoE layer (experts split over a tensor-parallel group that holds the same tokens; index
selection and one all-reduce, no all-to-all) against PyTorch in float64 and against the
all-to-all layer on one rank with the same tokens and weights, on groups of 1 to 4 ranks and two
groups of two: top-1, top-2 and top-6, drops and dropless, GeLU and SwiGLU, the router variants;
pipeline degrees give the very same bits as degree 1.

With k <= 2 the PPMoE layer must give the one-rank all-to-all layer's bits (outputs, losses, input
and gate gradients; each rank's expert gradients are its slice of the one-rank layer's); with
k > 2 equal to float32 rounding (the all-reduce sums three or more shares in its own order).
In bf16 its expert matmuls round as the all-to-all layer's do, and its all-reduces of y and dx
carry bf16 (each rank's share rounded, the sum rounded again; no token rows cross a wire):
checked against PyTorch float64 doing those roundings (in norm, as test_moe_layer.py does bf16),
not against the all-to-all layer's bits.

Run: /usr/bin/python3 tests/reference/test_ppmoe_layer.py [--inprocess]   (needs build/pipemoe)
"""
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import IN_PROCESS, Failures, mpirun_async  # noqa: E402
import moe_layer_reference as ref  # noqa: E402

TOLERANCE = 1e-5  # max |ours - torch| / max |torch|, per tensor
REPLICATED = ["y", "aux", "z_loss", "dx", "dwg"]  # the same on every rank of a group
EXPERT = ["dw1", "db1", "dw2", "db2", "w1", "w2"]  # each rank's experts: a slice along dim 0

# world ranks, ranks per group (tp), tokens per group, model dim, hidden, experts, top-k, capacity
# factor, seed[, flags]
CASES = [
    (1, 1, 40, 24, 40, 4, 2, 1.25, 51),
    (2, 2, 48, 32, 48, 4, 2, 1.25, 52),
    (2, 2, 40, 24, 32, 4, 1, 1.0, 53),
    (4, 4, 32, 16, 32, 8, 2, 0.5, 54),  # many dropped choices
    (3, 3, 36, 24, 24, 6, 2, 2.0, 55, ["--z-loss-coef", 0.1, "--gate-normalize", "false"]),
    (4, 4, 40, 16, 16, 8, 2, 0.0, 56, ["--activation", "swiglu", "--balance-bias"]),  # dropless
    (2, 2, 48, 16, 24, 8, 2, 0.0, 57, ["--skew", 1]),  # every first choice on rank 0's expert 0
    (2, 2, 32, 16, 8, 16, 6, 1.0, 58),  # top-6 of 16 fine-grained experts: to float32 rounding
    (4, 2, 40, 16, 24, 4, 2, 1.25, 59),  # two groups of two, each with its own tokens
    (2, 2, 48, 32, 48, 4, 2, 1.25, 60, ["--dtype", "bf16"]),
    (4, 2, 40, 16, 24, 4, 2, 0.0, 61, ["--dtype", "bf16", "--activation", "swiglu"]),
    # bf16 GEMMs in AMX's order (the tiles where the CPU has them, the model elsewhere)
    (4, 2, 40, 16, 24, 4, 2, 1.25, 62, ["--dtype", "bf16", "--bf16-order", "amx"]),
]
TOLERANCE_BF16 = 1e-3  # norm error against PyTorch doing the same roundings (test_moe_layer.py)
DEGREES = [(2, 2), (3, 1), (1, 4), (5, 3)]


def layer_args(T, M, H, E, k, f, seed, flags):
    before = []  # pipemoe's own options go before the command
    if "--bf16-order" in flags:
        i = flags.index("--bf16-order")
        before, flags = flags[i:i + 2], flags[:i] + flags[i + 2:]
    return before + ["layer", "--tokens", T, "--model-dim", M, "--hidden", H, "--experts", E, "--top-k", k,
                     "--capacity-factor", f, "--seed", seed, "--aux-coef", 0.05] + flags


def load(folder, rank, name):
    return np.load(f"{folder}/rank{rank}/{name}.npy")


def main():
    failures = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            world, tp, T, M, H, E, k, f, seed = case[:9]
            flags = case[9] if len(case) > 9 else []
            name = f"world {world} tp {tp} T={T} M={M} H={H} E={E} k={k} f={f}" + "".join(f" {a}" for a in flags)
            args = layer_args(T, M, H, E, k, f, seed, flags)
            one = os.path.join(tmp, f"ep{seed}")
            ours = os.path.join(tmp, f"pp{seed}")
            # every run of the case at once: the one-rank layer, PPMoE at degree 1 and at the others
            runs = [mpirun_async(1, args + ["--strategy", "ep", "--dump", one]),
                    mpirun_async(world, args + ["--strategy", "ppmoe", "--tp", tp, "--dump", ours])]
            runs += [mpirun_async(world, args + ["--strategy", "ppmoe", "--tp", tp, "--degree", dfwd, "--degree-bwd",
                                                 dbwd, "--dump", os.path.join(tmp, f"pp{seed}_{dfwd}_{dbwd}")])
                     for dfwd, dbwd in DEGREES]
            runs[0].result()
            bf16 = "bf16" in flags
            _, expected = ref.compute(one, bf16_wire=False, ppmoe_group=tp)
            runs[1].result()
            meta = json.load(open(f"{ours}/meta.json"))
            failures.check(meta["strategy"] == "ppmoe" and meta["group_size"] == tp and
                           meta["dtype"] == ("bf16" if bf16 else "fp32") and
                           (not bf16 or meta.get("bf16_order") == ("amx" if "amx" in flags else "dot")), f"{name}: ran {meta}")
            exact = k <= 2 and not bf16
            El = E // tp
            for r in range(world):
                g, j = divmod(r, tp)  # group, rank in the group
                if g > 0:
                    # another group's tokens: its ranks agree with each other, and differ from group 0's
                    for t in REPLICATED:
                        failures.check(np.array_equal(load(ours, r, t), load(ours, g * tp, t)),
                                       f"{name} rank {r} {t}: differs from its group's rank 0")
                    failures.check(not np.array_equal(load(ours, r, "x"), load(ours, 0, "x")),
                                   f"{name} rank {r}: group {g} has group 0's tokens")
                    continue
                failures.check(np.array_equal(load(ours, r, "expert_index"), expected[0]["expert_index"]) and
                               np.array_equal(load(ours, r, "expert_slot"), expected[0]["expert_slot"]),
                               f"{name} rank {r}: routing differs from the reference")
                for t in REPLICATED + EXPERT:
                    mine = load(ours, r, t)
                    full = load(one, 0, t)
                    want = full[j * El:(j + 1) * El] if t in EXPERT else full
                    if exact:
                        failures.check(np.array_equal(mine, want),
                                       f"{name} rank {r} {t}: not the one-rank all-to-all layer's bits "
                                       f"(max diff {np.max(np.abs(mine.astype(np.float64) - want)):.3e})")
                    if t in expected[0]:
                        torch_t = expected[0][t]
                        torch_t = torch_t[j * El:(j + 1) * El] if t in EXPERT else torch_t
                        error, tolerance = (ref.norm_error, TOLERANCE_BF16) if bf16 else (ref.relative_error, TOLERANCE)
                        err = error(mine.astype(np.float64), torch_t)
                        failures.check(mine.shape == torch_t.shape and err <= tolerance,
                                       f"{name} rank {r} {t}: relative error {err:.2e} against PyTorch")
            if bf16:  # the rounding shows: the exact answer is further away than the emulated one
                exact_y = ref.compute(one, emulate_bf16=False)[1][0]["y"]
                err = ref.norm_error(load(ours, 0, "y").astype(np.float64), exact_y)
                failures.check(3e-4 <= err <= 8 * 2.0 ** -8, f"{name}: y {err:.2e} from the exact answer")
            print(f"{name}: matches PyTorch float64" + (" and the one-rank all-to-all layer bit for bit" if exact
                                                        else " doing the same bf16 roundings" if bf16 else ""),
                  flush=True)
            for run in runs[2:]:
                run.result()
            for dfwd, dbwd in DEGREES:
                folder = os.path.join(tmp, f"pp{seed}_{dfwd}_{dbwd}")
                for r in range(world):
                    for t in REPLICATED + EXPERT:
                        a, b = load(ours, r, t), load(folder, r, t)
                        failures.check(np.array_equal(a, b), f"{name} rank {r} {t}: degree {dfwd}/{dbwd} differs "
                                                             f"from degree 1 (max diff {np.max(np.abs(a - b)):.3e})")
            print(f"{name}: degrees {DEGREES} give the same bits as degree 1", flush=True)
    failures.finish("test_ppmoe_layer" + (" (ranks in process)" if IN_PROCESS else ""))


if __name__ == "__main__":
    main()
