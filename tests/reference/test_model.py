#!/usr/bin/python3
"""The whole model against PyTorch in float64, on 1, 2 and 4 ranks: logits, loss and every parameter
gradient after one forward/backward (within 1e-4 relative), then the loss of each of a few
training steps (AdamW, clipping, warm-up, the selection bias's moves) along the same trajectory.
In bf16 the reference does the same roundings (model_reference.py) and the errors are measured in
norm (a value rounded the other way moves by one bf16 step, 2^-8 of it): within TOLERANCE_BF16 at
the first step, TOLERANCE_BF16_LATER_STEPS after it.
PPMoE with the dense blocks split over a tensor-parallel group (TP_VARIANTS): each rank's slices of
the split weights and their gradients against the matching slices of the whole model's, the
vocabulary-parallel logits column by column; with two such groups (tp 2 x dp 2) every replica's
slices. Gradients all-reduced with bf16 on the wire (GRAD_WIRE_VARIANTS): against the reference
doing the same roundings, PPMoE's expert replicas summed over the groups included. Llama's backbone
(RMSNorm, rotary embeddings, SwiGLU dense MLPs: BACKBONE_VARIANTS) with the same checks.
PIPEMOE_MODEL_VARIANTS=backbone,bf16 runs only those lists (after the three plain cases).

Run: /usr/bin/python3 tests/reference/test_model.py   (needs build/pipemoe)
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failures, mpirun  # noqa: E402
import model_reference as ref  # noqa: E402
from moe_layer_reference import norm_error, relative_error  # noqa: E402

TOLERANCE = 1e-4
TOLERANCE_BF16 = 2e-3  # |ours - torch| / |torch| in norm, bf16 against the same roundings in float64
# gradients summed with bf16 on the wire against the exact sum: each rank's share and the sum
# rounded (2 x 2^-9 of a value; more where the shares cancel), measured 2.0e-3 to 3.5e-3
TOLERANCE_BF16_WIRE_EXACT = 5e-3
# bf16, the steps after the first: AdamW's first updates move every weight by about lr whatever
# its gradient's size, so an element of a small gradient (a norm's gain, a key bias under rotary
# embeddings) that bf16 rounding moves across zero moves its weight the other way, and the two
# trajectories part: measured up to 4.6e-3 on the losses and gradient norms of steps 1 and 2 (step
# 0, every value and gradient, stays within TOLERANCE_BF16)
TOLERANCE_BF16_LATER_STEPS = 1e-2
STEPS = 3
CONFIG = ["seq_len=16", "d_model=32", "layers=2", "heads=2", "mlp_hidden=48", "moe_every=2", "experts=4", "top_k=2",
          "capacity_factor=1.0", "expert_hidden=40", "aux_coef=0.05", "batch_size=3", "tokenizer_vocab=301",
          "lr=0.01", "warmup_steps=2", "max_steps=10", "grad_clip=0.5", "weight_decay=0.1"]


def check(folder, ranks, seed, degree, f, variant=()):
    args = ["model-check", "--dump", folder, "--steps", STEPS, "--degree", degree] + sum(
        (["--set", kv] for kv in CONFIG + list(variant) + [f"seed={seed}"]), [])
    mpirun(ranks, args, timeout=300)
    model = ref.Model(folder)
    name = f"{ranks} ranks, seed {seed}, degree {degree}" + (f", {' '.join(variant)}" if variant else "")
    bf16 = model.c.get("dtype", "fp32") == "bf16"
    f.check(bf16 == ("dtype=bf16" in variant), f"{name}: the model ran dtype {model.c.get('dtype')}")
    f.check(model.meta.get("bf16_order") == ("amx" if "bf16_order=amx" in variant else "dot"),
            f"{name}: the model's bf16 GEMMs summed in the {model.meta.get('bf16_order')} order")
    tolerance, error = (TOLERANCE_BF16, norm_error) if bf16 else (TOLERANCE, relative_error)
    # gradients all-reduced with bf16 on the wire: the reference does the same roundings
    # (model_reference.bf16_wire_grads), and the exact sum must be visibly further away
    bf16_wire = "grad_allreduce_dtype=bf16" in variant and ranks > 1
    # PPMoE: a rank's share of a replicated gradient is not its tokens' (the gate's gradient comes
    # from its own experts only), which the reference does not split: against the exact sum, within
    # the two roundings
    wire_exact = bf16_wire and "moe_strategy=ppmoe" in variant
    # ...but PPMoE's expert replicas (several tensor-parallel groups) are each a whole group's
    # gradient: the reference sums the groups' shares with the same roundings
    replica_wire = wire_exact and model.P > model.expert_ranks
    if bf16_wire:
        tolerance, error = (TOLERANCE_BF16_WIRE_EXACT if wire_exact else TOLERANCE_BF16), norm_error
    state = {}
    for step in range(STEPS):
        if bf16 and step == 1:
            tolerance = max(tolerance, TOLERANCE_BF16_LATER_STEPS)
        total, ce, aux, logits = model.global_loss(folder, step)
        ours = model.meta["loss"][step]
        f.check(abs(ours - ce) <= tolerance * abs(ce), f"{name} step {step}: loss {ours} vs torch {ce}")
        f.check(abs(model.meta["aux"][step] - aux) <= tolerance * max(abs(aux), 1e-12) + 1e-9,
                f"{name} step {step}: aux {model.meta['aux'][step]} vs torch {aux}")
        lr = ref.learning_rate(model.c, step)
        f.check(abs(model.meta["lr"][step] - lr) <= 1e-12 + 1e-9 * lr, f"{name} step {step}: lr {model.meta['lr'][step]} vs {lr}")
        if bf16_wire and (replica_wire or not wire_exact):
            exact = ref.bf16_wire_grads(model, total, experts_only=wire_exact)
        else:
            exact = total.backward()
        if step == 0:
            for r in range(ranks):
                want = logits[r].detach().numpy()
                if model.vocab_parallel:  # this rank's columns of the vocabulary
                    want = np.split(want, model.dense_tp, axis=1)[r % model.dense_tp]
                err = error(np.load(f"{folder}/rank{r}/logits.npy").astype(np.float64), want)
                f.check(err <= tolerance, f"{name} rank {r}: logits relative error {err:.2e}")
            worst = worst_replica = 0.0
            for n, w in model.params.items():
                g = w.grad.numpy()
                replica = replica_wire and model.is_expert(n)
                for r in range(ranks):  # every rank's slices, in every data-parallel replica
                    ours_g = np.load(f"{folder}/rank{r}/grad.{n}.npy").astype(np.float64)
                    if model.shard(n):
                        want = ref.slice_of(g, *model.shard(n), r % model.dense_tp, model.dense_tp)
                    else:
                        want = np.split(g, model.expert_ranks)[r % model.expert_ranks] if model.is_expert(n) else g
                    err = error(ours_g, want)
                    if replica:
                        worst_replica = max(worst_replica, err)
                    else:
                        worst = max(worst, err)
                    f.check(ours_g.shape == want.shape and err <= (TOLERANCE_BF16 if replica else tolerance),
                            f"{name} rank {r}: gradient of {n} relative error {err:.2e}")
            if wire_exact:  # the option must really round: a float32 wire would be 1e-7 from the exact sum
                f.check(worst > 1e-4, f"{name}: the all-reduced gradients show no bf16 rounding (worst {worst:.1e})")
            if replica_wire:  # and the replicas' sums are the wire's
                from_exact = max(error(np.load(f"{folder}/rank0/grad.{n}.npy").astype(np.float64),
                                       np.split(g.numpy(), model.expert_ranks)[0])  # rank 0's experts
                                 for n, g in exact.items() if model.is_expert(n))
                f.check(from_exact > 1e-4 and from_exact > 2 * worst_replica,
                        f"{name}: the expert replicas' gradients are {from_exact:.1e} from the exact sum, "
                        f"{worst_replica:.1e} from the bf16 wire's: no bf16 rounding seen")
                print(f"{name}: expert replicas' gradients {worst_replica:.1e} from the bf16 wire's sum, "
                      f"{from_exact:.1e} from the exact sum", flush=True)
            if bf16_wire and not wire_exact:
                from_exact = max(error(np.load(f"{folder}/rank0/grad.{n}.npy").astype(np.float64), g.numpy())
                                 for n, g in exact.items())
                f.check(from_exact > 1e-4 and from_exact > 2 * worst,
                        f"{name}: the all-reduced gradients are {from_exact:.1e} from the exact sum, {worst:.1e} from "
                        f"the bf16 wire's: no bf16 rounding seen")
            print(f"{name}: logits, loss and {len(model.params)} gradients match (worst {worst:.1e})", flush=True)
        norm = ref.adamw_step(model, state, model.c, step, lr)
        model.update_bias()
        f.check(abs(model.meta["grad_norm"][step] - norm) <= tolerance * norm,
                f"{name} step {step}: gradient norm {model.meta['grad_norm'][step]} vs torch {norm}")
    print(f"{name}: losses over {STEPS} steps match: {model.meta['loss']}", flush=True)


# The designs the ScMoE paper compares, as configurations of the same model: the shortcut at each
# tap point (with and without the coefficient gate, top-1 and top-2), the shared expert beside a
# top-1 MoE without the shortcut, and ScMoE with an MoE in every block (pos1).
VARIANTS = [
    (1, 24, 1, ["arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "coef_gate=true", "top_k=1"]),
    (2, 25, 2, ["arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "top_k=1"]),
    (2, 26, 1, ["arch=scmoe", "scmoe_tap=pos1", "shared_expert_hidden=36", "coef_gate=true", "top_k=2"]),
    (2, 27, 1, ["arch=scmoe", "scmoe_tap=pos3", "shared_expert_hidden=36", "top_k=1"]),
    (1, 28, 1, ["arch=scmoe", "scmoe_tap=pos3", "shared_expert_hidden=36", "coef_gate=true", "top_k=2"]),
    (2, 29, 1, ["arch=moe", "shared_expert_hidden=36", "top_k=1"]),
    (1, 30, 2, ["arch=moe", "shared_expert_hidden=36", "coef_gate=true", "top_k=1"]),
    (2, 31, 1, ["arch=scmoe", "scmoe_tap=pos1", "moe_every=1", "shared_expert_hidden=36", "top_k=1"]),
]
# The router variants (gates not normalised, z-loss, the selection bias moved by the load after
# every step), on the top-2 model and on ScMoE.
ROUTER_VARIANTS = [
    (2, 32, 1, ["gate_normalize=false", "z_loss_coef=0.01"]),
    (2, 33, 2, ["router_bias_rate=0.05", "z_loss_coef=0.002"]),
    (2, 47, 2, ["drop_policy=probs", "capacity_factor=0.75"]),
    (1, 34, 1, ["arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "top_k=2", "router_bias_rate=0.05"]),
    # SwiGLU experts; a DeepSeek-style block: a shared expert beside 8 fine-grained SwiGLU experts,
    # top-4, balanced by the selection bias instead of the aux loss
    (2, 35, 2, ["expert_activation=swiglu"]),
    (2, 36, 1, ["expert_activation=swiglu", "experts=8", "top_k=4", "expert_hidden=12", "shared_expert_hidden=24",
                "aux_coef=0", "router_bias_rate=0.05", "z_loss_coef=0.001", "capacity_factor=0"]),
    (1, 37, 1, ["arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "top_k=1", "expert_activation=swiglu"]),
    # DeepSeek-V3's router: sigmoid scores normalised over the chosen experts, bias balancing
    (2, 38, 1, ["router_score=sigmoid", "experts=8", "top_k=4", "expert_hidden=12", "shared_expert_hidden=24",
                "expert_activation=swiglu", "shared_expert_activation=swiglu", "aux_coef=0.001",
                "router_bias_rate=0.05", "capacity_factor=0"]),
    # and its group-limited routing: 4 groups of 2 experts, one on each of 4 ranks, a token's 4
    # experts within its 2 best groups
    (4, 39, 1, ["router_score=sigmoid", "experts=8", "top_k=4", "expert_hidden=12", "route_groups=4",
                "route_top_groups=2", "expert_activation=swiglu", "router_bias_rate=0.05", "capacity_factor=0"]),
    # DeepSeek-V3's MoE whole: the first block dense, then an MoE in every block, the gate values
    # scaled by 2.5 beside a shared expert, within the best 2 of 4 groups, the balance loss per sequence
    (2, 40, 1, ["layers=3", "first_dense_blocks=1", "moe_every=1", "router_score=sigmoid", "experts=8", "top_k=4",
                "expert_hidden=12", "route_groups=4", "route_top_groups=2", "routed_scaling_factor=2.5",
                "shared_expert_hidden=24", "expert_activation=swiglu", "shared_expert_activation=swiglu",
                "router_bias_rate=0.05", "aux_coef=0.05", "aux_loss=sequence", "capacity_factor=0"]),
]
# PPMoE with the dense blocks split Megatron-style (one tensor-parallel group of all the ranks,
# every rank the same tokens): heads and MLP columns per rank, the tied embedding and head
# vocabulary-parallel (300 rows divide by 2 and 4; 301 do not: replicated head); with ScMoE and
# the shared expert; and the dense blocks replicated
TP_VARIANTS = [
    (2, 51, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300"]),
    (2, 52, 2, ["moe_strategy=ppmoe", "tp=2"]),
    (4, 53, 1, ["moe_strategy=ppmoe", "tp=4", "heads=4", "tokenizer_vocab=300"]),
    (2, 54, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300", "arch=scmoe", "scmoe_tap=pos2",
                "shared_expert_hidden=36", "top_k=1"]),
    (2, 55, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300", "tp_dense=replicate"]),
    # two tensor-parallel groups of two (tp 2 x dp 2): replicas of the experts and the dense slices
    (4, 56, 2, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300"]),
    # group-limited routing under PPMoE: each token's 2 experts within the best of 4 groups
    (2, 57, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300", "experts=8", "route_groups=4",
                "route_top_groups=1"]),
]
# bf16: the top-2 model on 1 and 2 ranks (pipelined), the DeepSeek-style block, and ScMoE with the
# coefficient gate
BF16_VARIANTS = [
    (1, 41, 1, ["dtype=bf16"]),
    (2, 42, 2, ["dtype=bf16"]),
    (2, 43, 1, ["dtype=bf16", "expert_activation=swiglu", "experts=8", "top_k=4", "expert_hidden=12",
                "shared_expert_hidden=24", "shared_expert_activation=swiglu", "router_score=sigmoid",
                "capacity_factor=0"]),
    (2, 44, 1, ["dtype=bf16", "arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "coef_gate=true", "top_k=1"]),
    # every GEMM (attention, dense MLPs, head, experts) in AMX's order, pipelined
    (2, 81, 2, ["dtype=bf16", "bf16_order=amx"]),
]

# the data-parallel gradient all-reduce with bf16 on the wire (comm/bf16_allreduce.h), 2 and 4 ranks,
# with fp32 and bf16 models
GRAD_WIRE_VARIANTS = [
    (2, 45, 1, ["grad_allreduce_dtype=bf16"]),
    (4, 46, 2, ["grad_allreduce_dtype=bf16"]),
    (2, 48, 1, ["grad_allreduce_dtype=bf16", "dtype=bf16"]),
    # PPMoE over one tensor-parallel group: the replicated parameters' gradients cross in bf16,
    # the split ones are complete on their rank and stay as they are
    (2, 49, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300", "grad_allreduce_dtype=bf16"]),
    # two groups of two (tp 2 x dp 2): the expert replicas' gradients cross between the groups too
    (4, 50, 1, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300", "grad_allreduce_dtype=bf16"]),
]

# The backbone as Llama, Mixtral, DeepSeek and Qwen build it (RMSNorm, rotary embeddings, SwiGLU
# dense MLPs): alone and pipelined; with a DeepSeek-style MoE block; with another rotary base;
# split over a tensor-parallel group (SwiGLU's halves each split); with ScMoE; and in bf16
LLAMA = ["norm=rmsnorm", "position=rope", "mlp_activation=swiglu"]
BACKBONE_VARIANTS = [
    (1, 61, 1, LLAMA),
    (2, 62, 2, LLAMA + ["expert_activation=swiglu", "experts=8", "top_k=4", "expert_hidden=12",
                        "shared_expert_hidden=24", "shared_expert_activation=swiglu", "router_score=sigmoid",
                        "aux_coef=0.001", "router_bias_rate=0.05", "capacity_factor=0"]),
    (2, 63, 1, ["position=rope", "rope_theta=500000", "norm=rmsnorm"]),
    (2, 64, 1, LLAMA + ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300"]),
    (1, 65, 1, LLAMA + ["arch=scmoe", "scmoe_tap=pos2", "shared_expert_hidden=36", "top_k=1"]),
    (2, 66, 1, LLAMA + ["dtype=bf16"]),
    (4, 67, 2, LLAMA + ["experts=8"]),
    # grouped-query attention: 4 query heads over 2 and over 1 key/value heads (multi-query)
    (2, 68, 2, LLAMA + ["heads=4", "kv_heads=2"]),
    (1, 69, 1, ["heads=4", "kv_heads=1"]),
    (2, 70, 1, LLAMA + ["heads=4", "kv_heads=2", "dtype=bf16"]),
    # ...split over tensor-parallel groups: each rank its query heads and its key/value heads
    (2, 71, 1, LLAMA + ["heads=4", "kv_heads=2", "moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=300"]),
    (4, 72, 1, LLAMA + ["heads=8", "kv_heads=4", "moe_strategy=ppmoe", "tp=4", "tokenizer_vocab=300"]),
    (2, 73, 1, LLAMA + ["heads=4", "kv_heads=2", "moe_strategy=ppmoe", "tp=2", "tp_dense=replicate"]),
]


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, seed, degree in [(1, 21, 1), (2, 22, 1), (2, 23, 2)]:
            check(os.path.join(tmp, f"r{ranks}s{seed}"), ranks, seed, degree, f)
        only = os.environ.get("PIPEMOE_MODEL_VARIANTS")  # e.g. "backbone": run only that list
        lists = {"scmoe": VARIANTS, "router": ROUTER_VARIANTS, "bf16": BF16_VARIANTS, "tp": TP_VARIANTS,
                 "grad_wire": GRAD_WIRE_VARIANTS, "backbone": BACKBONE_VARIANTS}
        if only:
            lists = {name: lists[name] for name in only.split(",")}
        for ranks, seed, degree, variant in sum(lists.values(), []):
            check(os.path.join(tmp, f"r{ranks}s{seed}"), ranks, seed, degree, f, variant)
    f.finish("test_model")


if __name__ == "__main__":
    main()
