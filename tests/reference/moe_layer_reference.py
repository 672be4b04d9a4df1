"""The expert-parallel MoE layer computed by PyTorch in float64 from a `pipemoe layer --dump` folder.

Written from the layer's specification (README, "The MoE layer"), independently of the C++:
gate softmax and top-k (ties to the lower index), capacity ceil(k*f*T/E) per rank, slots filled
choice by choice then token by token, exact-GeLU or SwiGLU experts, GShard aux loss; the router variants:
gate values normalised over the top k or not, a selection bias added to the probabilities to
choose (not to the gate values), the z-loss mean(logsumexp(logits)^2); the loss whose gradients the
dump holds is sum(y * dy) + aux_coef * aux + z_loss_coef * z_loss on every rank.

With shared_hidden > 0 a shared expert (replicated weights shared.w1, shared.b1, shared.w2,
shared.b2 on every rank) adds FFN(x) to every token's output; each rank's gradients of it are those
of its own tokens (the layer does not all-reduce them).

With dtype bf16 (README, "bf16"): every expert matmul rounds both operands to bf16 and
accumulates in float64 here (the engine in fp32), in the forward and in the backward (its input
gradient and its weight gradient alike); the rows on the all-to-all are rounded to bf16 both ways
(the tokens going out and the experts' outputs coming back; in the backward the output gradients
going out and the input gradients coming back). Everything else stays as in fp32. With
emulate_bf16=False the same layer is computed without any rounding (the exact answer bf16 approximates).
"""
import json
import math

import numpy as np
import torch

torch.set_default_dtype(torch.float64)


def load(folder, rank, name, dtype=np.float64):
    return np.load(f"{folder}/rank{rank}/{name}.npy").astype(dtype)


def route(probs32, top_k, capacity, drop_by=None):
    """Expert and slot of every (token, choice); slot -1 when the expert was full. drop_by: None
    drops the last choices in filling order (first choices of every token, then second ...); else
    a function of the chosen experts giving each choice's gate value [T, k]: a full expert keeps its
    largest (Megatron-Core's "probs"; equal values keep the filling order)."""
    tokens, experts = probs32.shape
    # stable sort by descending probability: equal values keep the lower expert index first
    order = np.argsort(-probs32, axis=1, kind="stable")[:, :top_k]
    filling = [(t, j) for j in range(top_k) for t in range(tokens)]
    keep = np.ones((tokens, top_k), dtype=bool)
    if drop_by is not None:
        gate = drop_by(order)
        for e in range(experts):
            asked = [c for c in filling if order[c] == e]
            for c in sorted(asked, key=lambda c: -gate[c])[capacity:]:  # sorted() is stable
                keep[c] = False
    slot = np.full((tokens, top_k), -1, dtype=np.int64)
    count = np.zeros(experts, dtype=np.int64)
    for t, j in filling:
        e = order[t, j]
        if keep[t, j] and count[e] < capacity:
            slot[t, j] = count[e]
            count[e] += 1
    return order, slot


def gate_values(probs, chosen, normalize, routed_scale):
    """The gate values [T, k] of the chosen experts: their probabilities, over their sum when
    normalised (k > 1), times routed_scale."""
    gate = np.take_along_axis(probs, chosen, axis=1)
    if chosen.shape[1] > 1 and normalize:
        gate = gate / gate.sum(axis=1, keepdims=True)
    return gate * routed_scale


def limit_to_groups(scores, groups, top_groups):
    """Group-limited routing (DeepSeek-V3's n_group, topk_group): the selection scores with every
    expert outside a token's top_groups best groups at -inf. A group's score is the sum of its two
    best scores (its one score when it has one expert); equal groups keep the lower one first.
    top_groups 0 or groups: no limit."""
    if top_groups == 0 or top_groups >= groups:
        return scores
    tokens, experts = scores.shape
    per = experts // groups
    grouped = scores.reshape(tokens, groups, per)
    best = -np.sort(-grouped, axis=2)
    group_score = best[:, :, 0] if per == 1 else best[:, :, 0] + best[:, :, 1]
    keep = np.argsort(-group_score, axis=1, kind="stable")[:, :top_groups]
    allowed = np.zeros((tokens, groups), dtype=bool)
    np.put_along_axis(allowed, keep, True, axis=1)
    return np.where(np.repeat(allowed, per, axis=1), scores, -np.inf).astype(scores.dtype)


def balance_loss(balance_probs, chosen, experts, seq_len=0):
    """The aux loss: GShard's over all T tokens (seq_len 0), E * sum_e mean_t(p[t, e]) * (share of
    tokens whose first choice is e); or DeepSeek-V3's sequence-wise one, the same over each run of
    seq_len tokens with the share of the run's k choices per token that chose e, averaged over runs."""
    T, k = chosen.shape
    if seq_len == 0:
        first = torch.tensor(np.bincount(chosen[:, 0], minlength=experts) / T)
        return experts * (balance_probs.mean(dim=0) * first).sum()
    total = 0
    for b in range(T // seq_len):
        run = slice(b * seq_len, (b + 1) * seq_len)
        load = torch.tensor(np.bincount(chosen[run].reshape(-1), minlength=experts) / (k * seq_len))
        total = total + experts * (balance_probs[run].mean(dim=0) * load).sum()
    return total / (T // seq_len)


def gelu(u):
    return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))


def activate(h, activation):
    """The experts' activation of the pre-activation h: GeLU, or SwiGLU of h = [g | v]."""
    if activation == "swiglu":
        g, v = h.chunk(2, dim=1)
        return torch.nn.functional.silu(g) * v
    return gelu(h)


def to_bf16(t):
    """t's values rounded to bf16 (to nearest even), through float32 as the engine's are."""
    return t.to(torch.float32).to(torch.bfloat16).to(torch.float64)


class Wire(torch.autograd.Function):
    """A bf16 all-to-all: the rows arrive rounded, and so do their gradients going back."""

    @staticmethod
    def forward(ctx, t):
        return to_bf16(t)

    @staticmethod
    def backward(ctx, g):
        return to_bf16(g)


class SharesSumBf16(torch.autograd.Function):
    """PPMoE's bf16 all-reduce of the group's shares of y: each share rounded to bf16, the sum
    rounded again (comm/bf16_allreduce.h); y's gradient reaches every share as it is."""

    @staticmethod
    def forward(ctx, *shares):
        total = sum(to_bf16(t) for t in shares)
        return to_bf16(total)

    @staticmethod
    def backward(ctx, g):
        return tuple(g for _ in ctx.needs_input_grad)


class GradToBf16(torch.autograd.Function):
    """The identity whose gradient is rounded to bf16: a share of dx entering PPMoE's bf16
    all-reduce, and the sum it leaves."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return to_bf16(g)


class Bf16Matmul(torch.autograd.Function):
    """a @ b on bf16 operands, in the forward and in both gradient products."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return to_bf16(a) @ to_bf16(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = to_bf16(g)
        return g @ to_bf16(b).T, to_bf16(a).T @ g


def compute(folder, emulate_bf16=True, bf16_wire=True, ppmoe_group=0):
    """Returns (meta, per-rank dict of reference tensors as numpy float64). bf16_wire=False: the
    bf16 layer without an all-to-all (PPMoE: its matmuls round, no rows cross a bf16 wire).
    ppmoe_group=G (with bf16): as PPMoE over a group of G ranks sums its shares of y and of dx in
    bf16, each rank's share of y its own experts' outputs, of dx its experts' input gradients plus,
    on the rank that owns a token's first kept choice (rank 0 when none is), the gate's."""
    meta = json.load(open(f"{folder}/meta.json"))
    bf16 = meta.get("dtype", "fp32") == "bf16" and emulate_bf16
    matmul = Bf16Matmul.apply if bf16 else torch.matmul
    wire = Wire.apply if bf16 and bf16_wire else (lambda t: t)
    P, E, k = meta["world_size"], meta["experts"], meta["top_k"]
    f, aux_coef = meta["capacity_factor"], meta["aux_coef"]
    z_coef = meta.get("z_loss_coef", 0.0)
    activation = meta.get("activation", "gelu")
    normalize = meta.get("normalize_gates", True)
    routed_scale = meta.get("routed_scale", 1.0)  # DeepSeek-V3's routed_scaling_factor
    # the router's scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3)
    score = torch.sigmoid if meta.get("router_score", "softmax") == "sigmoid" else lambda v: torch.softmax(v, dim=1)
    # the selection bias is replicated: every rank holds the same one
    bias32 = load(folder, 0, "router_bias", np.float32) if meta.get("balance_bias") else None
    El = E // P

    w1 = torch.tensor(np.concatenate([load(folder, r, "w1") for r in range(P)]), requires_grad=True)
    b1 = torch.tensor(np.concatenate([load(folder, r, "b1") for r in range(P)]), requires_grad=True)
    w2 = torch.tensor(np.concatenate([load(folder, r, "w2") for r in range(P)]), requires_grad=True)
    b2 = torch.tensor(np.concatenate([load(folder, r, "b2") for r in range(P)]), requires_grad=True)

    shared_hidden = meta.get("shared_hidden", 0)
    ranks = []
    total = 0
    for r in range(P):
        x = torch.tensor(load(folder, r, "x"), requires_grad=True)
        shared = {n: torch.tensor(load(folder, r, f"shared.{n}"), requires_grad=True)
                  for n in ("w1", "b1", "w2", "b2")} if shared_hidden > 0 else None
        wg = torch.tensor(load(folder, r, "wg"), requires_grad=True)
        dy = torch.tensor(load(folder, r, "dy"))
        T = x.shape[0]
        capacity = k * T if f == 0 else math.ceil(k * f * T / E)  # 0: dropless
        logits = x @ wg
        probs = score(logits)
        # routing decisions from float32 scores, as the specification says
        probs32 = score(torch.tensor(load(folder, r, "x", np.float32)) @
                        torch.tensor(load(folder, r, "wg", np.float32))).numpy()
        groups, top_groups = meta.get("route_groups", 1), meta.get("route_top_groups", 0)
        select32 = probs32 if bias32 is None else probs32 + bias32
        drop_by = (lambda c: gate_values(probs32, c, normalize, routed_scale)) \
            if meta.get("drop_policy", "position") == "probs" else None
        chosen, slot = route(limit_to_groups(select32, groups, top_groups), k, capacity, drop_by)
        # what the choice would be without the bias
        unbiased = route(limit_to_groups(probs32, groups, top_groups), k, capacity)[0]
        unlimited = route(select32, k, capacity)[0]  # and without the group limit
        by_position = route(limit_to_groups(select32, groups, top_groups), k, capacity)[1]  # and the position policy
        chosen_t = torch.tensor(chosen)
        gate = probs.gather(1, chosen_t)
        if k > 1 and normalize:
            gate = gate / gate.sum(dim=1, keepdim=True)
        gate = gate * routed_scale
        G = ppmoe_group if bf16 and ppmoe_group > 0 else 1
        # PPMoE in bf16: rank g of the group reads x as x_in[g] (its share of dx rounded), the gate
        # reads each token through its owner's copy, and the sum of the shares is rounded once more
        x_in = [x] if G == 1 else [GradToBf16.apply(x_all) for x_all in [GradToBf16.apply(x)] for _ in range(G)]
        if G > 1:
            kept = slot >= 0
            first = np.where(kept.any(axis=1), chosen[np.arange(T), kept.argmax(axis=1)], 0)
            owner = np.where(kept.any(axis=1), first // (E // G), 0)
            x_gate = sum(torch.tensor((owner == g).astype(np.float64))[:, None] * x_in[g] for g in range(G))
            logits = x_gate @ wg
            probs = score(logits)
            gate = probs.gather(1, chosen_t)
            if k > 1 and normalize:
                gate = gate / gate.sum(dim=1, keepdim=True)
            gate = gate * routed_scale
        shares = [torch.zeros_like(x) for _ in range(G)]
        for e in range(E):
            g = e // (E // G)
            for j in range(k):
                tok = np.nonzero((chosen[:, j] == e) & (slot[:, j] >= 0))[0]
                if len(tok) == 0:
                    continue
                tok_t = torch.tensor(tok)
                u = wire(x_in[g][tok_t])
                out = wire(matmul(activate(matmul(u, w1[e]) + b1[e], activation), w2[e]) + b2[e])
                shares[g] = shares[g].index_add(0, tok_t, gate[tok_t, j:j + 1] * out)
        y = shares[0] if G == 1 else SharesSumBf16.apply(*shares)
        if shared is not None:  # no all-to-all: the bf16 roundings of its matmuls only
            y = y + matmul(activate(matmul(x, shared["w1"]) + shared["b1"], meta.get("shared_activation", "gelu")),
                           shared["w2"]) + shared["b2"]
        # sigmoid scores: the balance loss reads them normalised over the experts (DeepSeek-V3's s')
        balance_probs = probs / probs.sum(dim=1, keepdim=True) if score is torch.sigmoid else probs
        aux = balance_loss(balance_probs, chosen, E, meta.get("aux_seq_len", 0))
        z_loss = (torch.logsumexp(logits, dim=1) ** 2).mean()
        total = total + (y * dy).sum() + aux_coef * aux + z_coef * z_loss
        ranks.append(dict(x=x, wg=wg, y=y, aux=aux, z_loss=z_loss, chosen=chosen, slot=slot, capacity=capacity,
                          unbiased=unbiased, unlimited=unlimited, by_position=by_position, gate=gate, shared=shared))
    total.backward()

    out = []
    for r, d in enumerate(ranks):
        sl = slice(r * El, (r + 1) * El)
        out.append({
            "y": d["y"].detach().numpy(), "aux": np.array([d["aux"].item()]),
            "z_loss": np.array([d["z_loss"].item()]),
            "dx": d["x"].grad.numpy(), "dwg": d["wg"].grad.numpy(),
            "dw1": w1.grad[sl].numpy(), "db1": b1.grad[sl].numpy(),
            "dw2": w2.grad[sl].numpy(), "db2": b2.grad[sl].numpy(),
            "expert_index": d["chosen"], "expert_slot": d["slot"], "capacity": d["capacity"],
            "gate": d["gate"].detach().numpy(),
            **({f"dshared.{n}": t.grad.numpy() for n, t in d["shared"].items()} if d["shared"] else {}),
            "bias_changed_choices": not np.array_equal(d["chosen"], d["unbiased"]),
            "group_limit_changed_choices": not np.array_equal(d["chosen"], d["unlimited"]),
            "drop_policy_changed_slots": not np.array_equal(d["slot"], d["by_position"]),
        })
    return meta, out


def norm_error(ours, ref):
    """|ours - ref| / |ref| in the Frobenius norm: the error over the whole tensor."""
    scale = float(np.linalg.norm(ref)) if ref.size else 0.0
    return float(np.linalg.norm(ours - ref)) / max(scale, 1e-30) if ref.size else 0.0


def relative_error(ours, ref):
    """max |ours - ref| / max |ref|: the error measured against the tensor's scale."""
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return float(np.max(np.abs(ours - ref))) / max(scale, 1e-30) if ref.size else 0.0


def torch_bf16_output(folder, rank, expected):
    """The layer's output y on `rank` as PyTorch computes it in its own bf16 (torch.bfloat16
    tensors for the experts' inputs, weights and matmuls; its accumulation and rounding, not ours),
    from the reference's routing and gate values. The gate values and the sum stay float64."""
    meta = json.load(open(f"{folder}/meta.json"))
    P, E, k = meta["world_size"], meta["experts"], meta["top_k"]
    activation = meta.get("activation", "gelu")
    weights = {n: np.concatenate([load(folder, r, n) for r in range(P)]) for n in ("w1", "b1", "w2", "b2")}
    bf = {n: torch.tensor(v).to(torch.bfloat16) for n, v in weights.items()}
    x = torch.tensor(load(folder, rank, "x"))
    chosen, slot, gate = expected["expert_index"], expected["expert_slot"], expected["gate"]
    y = torch.zeros_like(x)
    for e in range(E):
        for j in range(k):
            tok = np.nonzero((chosen[:, j] == e) & (slot[:, j] >= 0))[0]
            if len(tok) == 0:
                continue
            u = x[torch.tensor(tok)].to(torch.bfloat16)
            h = activate((u @ bf["w1"][e] + bf["b1"][e]).to(torch.float64), activation).to(torch.bfloat16)
            out = (h @ bf["w2"][e] + bf["b2"][e]).to(torch.float64)
            y = y.index_add(0, torch.tensor(tok), torch.tensor(gate[tok, j:j + 1]) * out)
    if meta.get("shared_hidden", 0) > 0:
        se = {n: torch.tensor(load(folder, rank, f"shared.{n}")).to(torch.bfloat16) for n in ("w1", "b1", "w2", "b2")}
        h = activate((x.to(torch.bfloat16) @ se["w1"] + se["b1"]).to(torch.float64),
                     meta.get("shared_activation", "gelu")).to(torch.bfloat16)
        y = y + (h @ se["w2"] + se["b2"]).to(torch.float64)
    return y.numpy()
