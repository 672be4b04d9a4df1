#!/usr/bin/python3
"""The MoE layer against PyTorch in float64, on 1, 2, 3 and 4 ranks, k = 1 to 8, 2 to 64 experts
(fine-grained: many small ones), GeLU and SwiGLU experts, with and without dropped tokens,
dropless, the router variants (gates not normalised, z-loss, selection bias), several seeds, fp32 and
bf16; and pipeline degrees up to 16 giving the very same bits as degree 1.

bf16 is checked three ways, by the norm of the error over the norm of the tensor: against PyTorch
float64 doing the same roundings (the reference's Bf16Matmul and Wire) to TOLERANCE_BF16; against
the exact float64 answer (no rounding) to within BF16_BOUND and not closer than BF16_VISIBLE (the
rounding must show, else the layer ran fp32); and, for the output, at least as close to the exact
answer as PyTorch's own bf16 matmuls come (torch 1.13 on the CPU accumulates its bf16 products in
bf16: about 2e-2 off, against our 4e-3).
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import IN_PROCESS, Failures, mpirun_async  # noqa: E402
import moe_layer_reference as ref  # noqa: E402

TOLERANCE = 1e-5  # max |ours - torch| / max |torch|, per tensor
# bf16 against float64 doing the same roundings (norm of the error / norm of the tensor): what
# remains is fp32 against float64 accumulation (1e-7), and now and then a value that lands on the
# other side of a bf16 rounding boundary: it moves by one bf16 step (2^-8 of itself). Measured:
# up to 1.4e-4 at T=256, M=128, H=256; most tensors 1e-7.
TOLERANCE_BF16 = 1e-3
# bf16 against exact arithmetic: a rounding moves a value by at most 2^-8 of itself (bf16 keeps 8
# significant bits); a tensor passes through up to four of them in a row (input, weight, activation,
# output or gradient on the wire), so 8 x 2^-8 bounds the error; measured 1.5e-3 to 4.3e-3. At
# least BF16_VISIBLE of it must show.
BF16_BOUND = 8 * 2.0 ** -8
BF16_VISIBLE = 3e-4
TENSORS = ["y", "aux", "z_loss", "dx", "dwg", "dw1", "db1", "dw2", "db2"]

# ranks, tokens, model dim, hidden, experts, top-k, capacity factor, seed[, router flags]
CASES = [
    (1, 40, 24, 40, 4, 1, 1.25, 11),
    (1, 40, 24, 40, 4, 2, 2.0, 12),
    (2, 48, 32, 48, 4, 2, 1.25, 13),
    (2, 48, 32, 48, 8, 1, 4.0, 14),
    (2, 64, 32, 64, 2, 2, 1.0, 15),
    (4, 32, 16, 32, 8, 2, 0.5, 16),
    (4, 36, 16, 32, 4, 1, 1.0, 17),
    (4, 32, 24, 16, 8, 2, 4.0, 18),
    (3, 40, 24, 32, 6, 2, 1.25, 19),
    (3, 48, 16, 24, 3, 1, 4.0, 20),
    (2, 40, 16, 24, 4, 2, 0.0, 21),  # dropless (capacity factor 0): every choice computed
    # router variants, and the fine-grained top-k designs of 2026 (DeepSeek, Qwen3-MoE, OLMoE)
    (2, 48, 32, 48, 8, 2, 1.25, 22, ["--gate-normalize", "false"]),
    (2, 48, 32, 48, 8, 2, 1.25, 23, ["--z-loss-coef", 0.1]),
    (2, 48, 32, 48, 8, 2, 2.0, 24, ["--balance-bias"]),
    (2, 32, 16, 8, 16, 8, 0.0, 25, ["--gate-normalize", "false", "--z-loss-coef", 0.01]),
    (4, 32, 16, 8, 32, 6, 1.0, 26, ["--balance-bias", "--z-loss-coef", 0.05]),
    (1, 40, 24, 12, 64, 8, 1.25, 27),
    # SwiGLU experts, and a DeepSeek-style router on fine-grained SwiGLU experts
    (2, 48, 32, 24, 4, 2, 1.25, 28, ["--activation", "swiglu"]),
    (3, 40, 24, 16, 6, 1, 1.0, 29, ["--activation", "swiglu", "--z-loss-coef", 0.02]),
    (4, 32, 16, 8, 32, 8, 0.0, 30, ["--activation", "swiglu", "--balance-bias", "--gate-normalize", "true"]),
    # sigmoid router scores (DeepSeek-V3): normalised over the chosen k or not, with the aux loss,
    # the z-loss and the selection bias
    (2, 48, 32, 48, 8, 2, 1.25, 33, ["--router-score", "sigmoid", "--z-loss-coef", 0.05]),
    (4, 32, 16, 8, 32, 8, 0.0, 34, ["--router-score", "sigmoid", "--activation", "swiglu", "--balance-bias"]),
    (3, 40, 24, 16, 6, 3, 1.0, 35, ["--router-score", "sigmoid", "--gate-normalize", "false"]),
    # group-limited routing (DeepSeek-V3's n_group, topk_group): a group per rank with sigmoid scores,
    # the selection bias, the gate values scaled by 2.5 (routed_scaling_factor) and the sequence-wise
    # balance loss over 4 sequences of 8 tokens; groups that straddle ranks (12 experts in 4 groups on 3 ranks) in bf16
    (4, 32, 16, 8, 32, 8, 0.0, 51, ["--router-score", "sigmoid", "--balance-bias", "--activation", "swiglu",
                                    "--route-groups", 4, "--route-top-groups", 2, "--routed-scaling-factor", 2.5,
                                    "--aux-seq-len", 8]),
    (3, 40, 24, 16, 12, 4, 1.25, 52, ["--dtype", "bf16", "--route-groups", 4, "--route-top-groups", 2]),
    # a full expert drops its smallest gate values (Megatron-Core's drop policy "probs"), top-1 and
    # top-2, capacity factor 1 and 0.5
    (2, 48, 32, 48, 8, 1, 1.0, 53, ["--drop-policy", "probs"]),
    (3, 40, 24, 16, 6, 2, 0.5, 54, ["--drop-policy", "probs", "--dtype", "bf16", "--activation", "swiglu"]),
    # bf16 GEMMs in AMX's order (on AMX's tiles where the CPU has them, on the model elsewhere): the
    # same tolerances, and every degree the same bits; with a shared expert, dropless SwiGLU on 4 ranks
    (2, 64, 64, 96, 4, 2, 1.25, 55, ["--dtype", "bf16", "--bf16-order", "amx"]),
    (4, 32, 48, 40, 8, 2, 0.0, 56, ["--dtype", "bf16", "--activation", "swiglu", "--shared-hidden", 24,
                                    "--bf16-order", "amx"]),
    # heavy imbalance, dropless: every token's first choice is expert 0 (rank 0 computes them all)
    (2, 48, 16, 24, 8, 2, 0.0, 31, ["--skew", 1]),
    (4, 40, 16, 16, 8, 1, 0.0, 32, ["--skew", 1, "--activation", "swiglu"]),
    # bf16: expert GEMMs on bf16 operands, bf16 all-to-all payloads
    (1, 40, 24, 40, 4, 2, 1.25, 41, ["--dtype", "bf16"]),
    (2, 64, 64, 96, 4, 2, 1.25, 42, ["--dtype", "bf16"]),
    (3, 40, 24, 16, 6, 2, 0.0, 43, ["--dtype", "bf16", "--activation", "swiglu"]),
    (4, 32, 48, 24, 16, 4, 1.0, 44, ["--dtype", "bf16", "--router-score", "sigmoid", "--z-loss-coef", 0.02]),
    # fine-grained top-8 in bf16: both dispatches deduplicated (the backward's scaled on the expert side)
    (2, 32, 16, 8, 16, 8, 0.0, 48, ["--dtype", "bf16", "--activation", "swiglu"]),
    # a shared expert beside the routed ones (DeepSeek-MoE): GeLU, SwiGLU beside fine-grained
    # dropless SwiGLU experts, and in bf16
    (2, 48, 32, 48, 8, 2, 1.25, 45, ["--shared-hidden", 40]),
    (3, 40, 24, 16, 6, 2, 0.0, 46, ["--shared-hidden", 24, "--shared-activation", "swiglu", "--activation", "swiglu"]),
    (2, 64, 64, 96, 4, 2, 1.25, 47, ["--dtype", "bf16", "--shared-hidden", 64, "--shared-activation", "swiglu"]),
    # the experts' activations made again in the backward instead of kept (--recompute experts)
    (2, 48, 32, 48, 8, 2, 1.25, 49, ["--recompute", "experts"]),
    (3, 40, 24, 16, 6, 2, 0.0, 50, ["--dtype", "bf16", "--activation", "swiglu", "--shared-hidden", 24,
                                    "--shared-activation", "swiglu", "--recompute", "experts"]),
]
SHARED_TENSORS = ["dshared.w1", "dshared.b1", "dshared.w2", "dshared.b2"]
# (forward, backward) degrees compared bit for bit with (1, 1): every degree the planner can pick
# (1, 2, 3, 4, 6, 8, 12, 16) where the capacity allows, forward and backward apart
DEGREES = [(2, 2), (3, 1), (1, 3), (4, 2), (6, 8), (12, 16), (16, 12)]


def run_dump(folder, case, degree_fwd, degree_bwd):
    """Starts the layer's dump run; returns its future."""
    ranks, T, M, H, E, k, f, seed = case[:8]
    router = list(case[8]) if len(case) > 8 else []
    before = []  # pipemoe's own options go before the command
    if "--bf16-order" in router:
        i = router.index("--bf16-order")
        before, router = router[i:i + 2], router[:i] + router[i + 2:]
    return mpirun_async(ranks, before + ["layer", "--tokens", T, "--model-dim", M, "--hidden", H, "--experts", E,
                   "--top-k", k, "--capacity-factor", f, "--seed", seed, "--aux-coef", 0.05,
                   "--degree", degree_fwd, "--degree-bwd", degree_bwd, "--dump", folder] + router)


def main():
    failures = Failures()
    dropped_somewhere = kept_everything = False
    degrees_tested = set()
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            ranks, T, M, H, E, k, f, seed = case[:8]
            name = f"P={ranks} T={T} M={M} H={H} E={E} k={k} f={f} seed={seed}" + "".join(
                f" {a}" for a in (case[8] if len(case) > 8 else []))
            base = os.path.join(tmp, f"case{seed}_d1")
            run_dump(base, case, 1, 1).result()
            meta, expected = ref.compute(base)
            # the other degrees run while this case's results are checked
            degrees = [d for d in DEGREES if max(d) <= expected[0]["capacity"]]
            runs = {d: run_dump(os.path.join(tmp, f"case{seed}_d{d[0]}_{d[1]}"), case, *d) for d in degrees}
            router = case[8] if len(case) > 8 else []
            # the variant asked for is the one the layer ran (else the reference would agree trivially)
            failures.check(meta.get("normalize_gates") == ("false" not in router) and
                           meta.get("balance_bias") == ("--balance-bias" in router or "--skew" in router) and
                           abs(meta.get("z_loss_coef", -1) - (router[router.index("--z-loss-coef") + 1]
                                                              if "--z-loss-coef" in router else 0)) < 1e-7,
                           f"{name}: the layer did not run the router variant asked for: {meta}")
            failures.check(meta.get("activation") == (router[router.index("--activation") + 1] if "--activation" in router
                                                      else "gelu"),
                           f"{name}: the layer ran {meta.get('activation')} experts")
            failures.check(meta.get("routed_scale") == (router[router.index("--routed-scaling-factor") + 1]
                                                        if "--routed-scaling-factor" in router else 1.0),
                           f"{name}: the layer scaled its gate values by {meta.get('routed_scale')}")
            failures.check(meta.get("aux_seq_len") == (router[router.index("--aux-seq-len") + 1]
                                                       if "--aux-seq-len" in router else 0),
                           f"{name}: the layer's balance loss ran over sequences of {meta.get('aux_seq_len')}")
            failures.check(meta.get("router_score") == ("sigmoid" if "sigmoid" in router else "softmax"),
                           f"{name}: the layer scored with {meta.get('router_score')}")
            failures.check(meta.get("recompute_experts") == ("--recompute" in router),
                           f"{name}: recompute_experts {meta.get('recompute_experts')}")
            bf16 = "bf16" in router
            shared = "--shared-hidden" in router
            failures.check(meta.get("shared_hidden", 0) == (router[router.index("--shared-hidden") + 1] if shared else 0),
                           f"{name}: the layer ran a shared expert of {meta.get('shared_hidden')}")
            tensors = TENSORS + (SHARED_TENSORS if shared else [])
            failures.check(meta.get("dtype") == ("bf16" if bf16 else "fp32"), f"{name}: the layer ran {meta.get('dtype')}")
            order = router[router.index("--bf16-order") + 1] if "--bf16-order" in router else "dot"
            failures.check(not bf16 or meta.get("bf16_order") == order,
                           f"{name}: the bf16 GEMMs summed in the {meta.get('bf16_order')} order")
            exact = ref.compute(base, emulate_bf16=False)[1] if bf16 else None
            if "--skew" in router:
                failures.check(all((e["expert_index"][:, 0] == 0).all() for e in expected),
                               f"{name}: the skew should send every first choice to expert 0")
            groups = (router[router.index("--route-groups") + 1] if "--route-groups" in router else 1,
                      router[router.index("--route-top-groups") + 1] if "--route-top-groups" in router else 0)
            failures.check((meta.get("route_groups"), meta.get("route_top_groups")) == groups,
                           f"{name}: the layer routed with groups {meta.get('route_top_groups')} of {meta.get('route_groups')}")
            if groups[1] > 0:
                per = meta["experts"] // groups[0]
                failures.check(any(e["group_limit_changed_choices"] for e in expected) and
                               all(len(np.unique(e["expert_index"][t] // per)) <= groups[1]
                                   for e in expected for t in range(len(e["expert_index"]))),
                               f"{name}: the group limit changed no choice, or a token chose outside its groups")
            probs_policy = "--drop-policy" in router
            failures.check(meta.get("drop_policy") == ("probs" if probs_policy else "position") and
                           (not probs_policy or any(e["drop_policy_changed_slots"] for e in expected)),
                           f"{name}: drop policy {meta.get('drop_policy')}, or dropping by gate value changed nothing")
            if "--balance-bias" in router:
                failures.check(any(e["bias_changed_choices"] for e in expected),
                               f"{name}: the selection bias changed no choice: the case tests nothing")
            for r in range(ranks):
                ours_index = np.load(f"{base}/rank{r}/expert_index.npy")
                ours_slot = np.load(f"{base}/rank{r}/expert_slot.npy")
                failures.check(np.array_equal(ours_index, expected[r]["expert_index"]) and
                               np.array_equal(ours_slot, expected[r]["expert_slot"]),
                               f"{name} rank {r}: routing differs from the reference")
                drops = int((expected[r]["expert_slot"] < 0).sum())
                dropped_somewhere |= drops > 0
                kept_everything |= drops == 0
                for t in tensors:
                    ours = np.load(f"{base}/rank{r}/{t}.npy").astype(np.float64)
                    if not bf16:
                        err = ref.relative_error(ours, expected[r][t])
                        failures.check(ours.shape == expected[r][t].shape and err <= TOLERANCE,
                                       f"{name} rank {r} {t}: relative error {err:.2e} (shape {ours.shape})")
                        continue
                    err = ref.norm_error(ours, expected[r][t])
                    failures.check(ours.shape == expected[r][t].shape and err <= TOLERANCE_BF16,
                                   f"{name} rank {r} {t}: error {err:.2e} against the same roundings in float64")
                    # the router's losses stay fp32, and the shared expert's b2 gradient is the sum of
                    # dy, which reaches it without a rounding (no all-to-all, no GEMM)
                    if t not in ("aux", "z_loss", "dshared.b2"):
                        err = ref.norm_error(ours, exact[r][t])
                        failures.check(BF16_VISIBLE <= err <= BF16_BOUND,
                                       f"{name} rank {r} {t}: {err:.2e} from the exact answer, outside "
                                       f"[{BF16_VISIBLE:.0e}, {BF16_BOUND:.2e}]")
                if bf16:
                    ours = np.load(f"{base}/rank{r}/y.npy").astype(np.float64)
                    theirs = ref.norm_error(ref.torch_bf16_output(base, r, expected[r]), exact[r]["y"])
                    err = ref.norm_error(ours, exact[r]["y"])
                    failures.check(err <= theirs, f"{name} rank {r} y: {err:.2e} from the exact answer, PyTorch's "
                                                  f"own bf16 {theirs:.2e}")
            print(f"{name}: matches PyTorch float64" + (" doing the same bf16 roundings, within the bf16 "
                                                         "bound of the exact answer and closer to it than PyTorch's bf16" if bf16 else ""),
                  flush=True)
            for dfwd, dbwd in degrees:
                degrees_tested |= {dfwd, dbwd}
                folder = os.path.join(tmp, f"case{seed}_d{dfwd}_{dbwd}")
                runs[(dfwd, dbwd)].result()
                for r in range(ranks):
                    for t in tensors:
                        a = np.load(f"{base}/rank{r}/{t}.npy")
                        b = np.load(f"{folder}/rank{r}/{t}.npy")
                        failures.check(np.array_equal(a, b),
                                       f"{name} rank {r} {t}: degree {dfwd}/{dbwd} differs from degree 1 "
                                       f"(max diff {np.max(np.abs(a - b)):.3e})")
            print(f"{name}: degrees {degrees} give the same bits "
                  "as degree 1", flush=True)
    failures.check(dropped_somewhere and kept_everything,
                   "the cases must cover both dropped tokens and no drops")
    failures.check(degrees_tested >= {2, 3, 4, 6, 8, 12, 16},
                   f"every degree the planner can pick must be tested, got {sorted(degrees_tested)}")
    failures.finish("test_moe_layer" + (" (ranks in process)" if IN_PROCESS else ""))


if __name__ == "__main__":
    main()
