"""The GPT-style MoE model computed by PyTorch in float64 from a `pipemoe model-check` dump.

Written from the model's definition (src/model/gpt.h): token + position embeddings, pre-LayerNorm
blocks (eps 1e-5) with causal multi-head attention and a dense GeLU MLP or an MoE feed-forward
(every moe_every-th block), final LayerNorm, tied output, mean cross-entropy plus aux_coef times
the sum of the MoE aux losses. Data parallel over ranks: the loss is the mean of the ranks' losses;
each rank's MoE routes its own tokens with its own capacity; experts are global.

MoE blocks may add a dense shared expert on LN2's output, optionally scaled per token by a
coefficient gate sigmoid(x . w_cg + b_cg). With arch "scmoe" (ScMoE, Cai et al. 2025) the routed
MoE of block l reads, through a LayerNorm of its own (ln_moe), a representation of the block
before it, tapped at pos1 (block l's input, the preceding block's output), pos2 (the preceding
block's attention output, between its attention and MLP) or pos3 (the preceding block's input);
block l's output is then a + SE(LN2(a)) + MoE(LN_moe(tap)).

Attention may be grouped-query (kv_heads < heads: each key/value head serves heads / kv_heads
consecutive query heads). The backbone may be Llama's instead (norm "rmsnorm": x / sqrt(mean(x^2) + eps) * g, no mean and no
bias, for every norm; position "rope": no position embedding, the queries and keys of each head
turned by rotary embeddings in the rotate-half pairing, angle pos * rope_theta^(-2i/hd), computed
here in float64 from their definition; mlp_activation "swiglu": the dense MLP's W_fc = [W_g | W_v]).

With dtype bf16 the linear layers (attention's QKV and output projections, the dense MLP, the
shared expert and its coefficient gate, the tied LM head) and the experts are bf16 matmuls
(moe_layer_reference.Bf16Matmul: both operands rounded, forward and backward), and the MoE's rows
cross the all-to-all as bf16 both ways (Wire); the router, attention's own products, LayerNorm,
softmax and the loss stay as they are.
"""
import json
import math
import os

import numpy as np
import torch

# bf16 roundings; the experts' GeLU or SwiGLU; group-limited routing; the balance losses
from moe_layer_reference import Bf16Matmul, Wire, activate, balance_loss, gate_values, limit_to_groups, route

torch.set_default_dtype(torch.float64)


def layernorm(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    return (x - m) / torch.sqrt(v + eps) * g + b


def rmsnorm(x, g, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def rope(x, positions, theta):
    """x [B, H, S, hd] turned by rotary embeddings (rotate-half pairing) at positions [S]."""
    hd = x.shape[-1]
    half = hd // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    angle = positions.to(torch.float64)[:, None] * freq[None, :]  # [S, half]
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def matmul_of(bf16):
    """The linear layers' matmul: bf16 operands, or plain float64."""
    return Bf16Matmul.apply if bf16 else torch.matmul


def attention(x, w_qkv, b_qkv, w_proj, b_proj, B, S, H, mm=torch.matmul, rope_theta=None, kv_heads=None):
    """Causal self-attention; kv_heads < H: grouped-query, each key/value head serving H / kv_heads
    consecutive query heads (w_qkv's columns [W_q | W_k | W_v])."""
    D = x.shape[1]
    hd = D // H
    KV = kv_heads or H
    qkv = mm(x, w_qkv) + b_qkv
    q = qkv[:, :D].reshape(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
    k, v = (qkv[:, D + i * KV * hd:D + (i + 1) * KV * hd].reshape(B, S, KV, hd).transpose(1, 2)
            .repeat_interleave(H // KV, dim=1) for i in range(2))
    if rope_theta is not None:
        q, k = rope(q, torch.arange(S), rope_theta), rope(k, torch.arange(S), rope_theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(B * S, D)
    return mm(o, w_proj) + b_proj


def moe(x, wg, w1, b1, w2, b2, top_k, capacity_factor, normalize=True, bias=None, activation="gelu",
        router_score="softmax", bf16=False, groups=(1, 0), routed_scale=1.0, aux_seq_len=0,
        drop_policy="position"):
    """(y, aux loss, z-loss, the chosen experts [T, k]). bias: the selection bias (float32) or None;
    groups: (route_groups, route_top_groups) of group-limited routing; routed_scale: the gate values'
    factor (DeepSeek-V3's routed_scaling_factor); aux_seq_len: 0 for GShard's aux loss, else the
    sequence length of DeepSeek-V3's sequence-wise one; drop_policy: which choices a full expert
    drops ("position" or "probs")."""
    T = x.shape[0]
    E = wg.shape[1]
    C = top_k * T if capacity_factor == 0 else math.ceil(top_k * capacity_factor * T / E)  # 0: dropless
    logits = x @ wg
    probs = torch.sigmoid(logits) if router_score == "sigmoid" else torch.softmax(logits, dim=1)
    scores = probs.detach().numpy() if bias is None else probs.detach().numpy() + bias
    drop_by = (lambda c: gate_values(probs.detach().numpy(), c, normalize, routed_scale)) \
        if drop_policy == "probs" else None
    order, slot = route(limit_to_groups(scores, *groups), top_k, C, drop_by)
    kept = slot >= 0
    gate = probs.gather(1, torch.tensor(order))
    if top_k > 1 and normalize:
        gate = gate / gate.sum(dim=1, keepdim=True)
    gate = gate * routed_scale
    mm = matmul_of(bf16)
    wire = Wire.apply if bf16 else (lambda t: t)
    y = torch.zeros_like(x)
    for e in range(E):
        for j in range(top_k):
            tok = np.nonzero((order[:, j] == e) & kept[:, j])[0]
            if len(tok):
                tt = torch.tensor(tok)
                out = wire(mm(activate(mm(wire(x[tt]), w1[e]) + b1[e], activation), w2[e]) + b2[e])
                y = y.index_add(0, tt, gate[tt, j:j + 1] * out)
    balance_probs = probs / probs.sum(dim=1, keepdim=True) if router_score == "sigmoid" else probs
    aux = balance_loss(balance_probs, order, E, aux_seq_len)
    z_loss = (torch.logsumexp(logits, dim=1) ** 2).mean()
    return y, aux, z_loss, order


# The dense blocks' split weights (model/gpt.cpp add_split): the dimension split, and the parts it
# holds in proportion (q, k, v: equal, or heads : kv_heads : kv_heads), each part then split over
# the ranks.
DENSE_SHARDS = {"attn.w_qkv": (1, [1, 1, 1]), "attn.b_qkv": (0, [1, 1, 1]), "attn.w_proj": (0, [1]),
                "mlp.w_fc": (1, [1]), "mlp.b_fc": (0, [1]), "mlp.w_out": (0, [1])}


def split_parts(a, parts, dim):
    """a cut along dim into parts in the proportions `parts` (core/shard.h)."""
    unit = a.shape[dim] // sum(parts)
    return np.split(a, np.cumsum([p * unit for p in parts])[:-1], axis=dim)


def whole_of(slices, dim, parts):
    """The whole tensor from every rank's slice (core/shard.h put_shard)."""
    pieces = [split_parts(a, parts, dim) for a in slices]
    return np.concatenate([np.concatenate([p[g] for p in pieces], axis=dim) for g in range(len(parts))], axis=dim)


def slice_of(whole, dim, parts, place, places):
    """Rank `place`'s slice of the whole tensor (core/shard.h take_shard)."""
    return np.concatenate([np.split(g, places, axis=dim)[place] for g in split_parts(whole, parts, dim)], axis=dim)


class Model:
    """Parameters as float64 leaf tensors, experts gathered from every rank's dump."""

    def __init__(self, folder):
        self.meta = json.load(open(f"{folder}/meta.json"))
        c = self.meta["config"]
        self.c = c
        self.P = self.meta["world_size"]
        names = [f[len("param."):-len(".npy")] for f in sorted(os.listdir(f"{folder}/rank0")) if f.startswith("param.")]
        self.params = {}
        # auxiliary-loss-free balancing: each MoE block's selection bias is state, not a parameter
        # (no gradient): float32 like ours, moved after every step by update_bias
        self.bias = {n[:-len(".moe.router_bias")]: np.load(f"{folder}/rank0/param.{n}.npy").astype(np.float32)
                     for n in names if n.endswith(".moe.router_bias")}
        self.load = {}
        # tensor-parallel dense blocks (tp_dense split, one group of all the ranks): each rank's
        # slices of the split weights, put together as core/shard.h does
        self.dense_tp = self.meta.get("dense_tp", 1)
        self.vocab_parallel = self.meta.get("vocab_parallel", False)
        # the experts lie split over the first expert_ranks ranks (PPMoE: a tensor-parallel group),
        # and so do the dense slices over the first dense_tp; further groups (data parallel) hold
        # replicas, which the gradient checks compare too
        self.expert_ranks = self.meta.get("expert_ranks", self.P)
        for n in names:
            if n.endswith(".moe.router_bias"):
                continue
            arrays = [np.load(f"{folder}/rank{r}/param.{n}.npy").astype(np.float64) for r in range(self.P)]
            if self.shard(n):
                value = whole_of(arrays[:self.dense_tp], *self.shard(n))
            elif self.is_expert(n):
                value = np.concatenate(arrays[:self.expert_ranks])  # experts: global [E, ...]
            else:
                value = arrays[0]
            self.params[n] = torch.tensor(value, requires_grad=True)

    def is_expert(self, name):
        return ".moe." in name and not name.endswith(".moe.wg")

    def shard(self, name):
        """(dim, parts) of a tensor-parallel parameter's slices (Parameter::shard_dim, shard_groups), or None."""
        if self.dense_tp == 1:
            return None
        if name == "wte":
            return (0, [1]) if self.vocab_parallel else None
        for suffix, (dim, parts) in DENSE_SHARDS.items():
            if name.endswith(suffix):
                if suffix in ("mlp.w_fc", "mlp.b_fc") and self.c.get("mlp_activation", "gelu") == "swiglu":
                    parts = [1, 1]  # [W_g | W_v]: each half split
                kv = self.c.get("kv_heads", 0) or self.c["heads"]
                if suffix in ("attn.w_qkv", "attn.b_qkv") and kv != self.c["heads"]:
                    parts = [self.c["heads"], kv, kv]  # grouped-query: q wider than k and v
                return dim, parts
        return None

    def norm(self, x, name):
        """The norm whose parameters are name.g (and name.b): LayerNorm or RMSNorm (config "norm")."""
        p = self.params
        if self.c.get("norm", "layernorm") == "rmsnorm":
            return rmsnorm(x, p[name + ".g"])
        return layernorm(x, p[name + ".g"], p[name + ".b"])

    def decays(self, name):
        return any(name.endswith(s) for s in ("w_qkv", "w_proj", "w_fc", "w_out", "moe.wg", "moe.w1", "moe.w2",
                                              "se.w_cg"))

    def rank_loss(self, inputs, targets):
        """(mean cross-entropy, sum of aux losses, logits) of one rank's batch."""
        c, p = self.c, self.params
        bf16 = c.get("dtype", "fp32") == "bf16"
        mm = matmul_of(bf16)
        B, S = inputs.shape
        inp = torch.tensor(inputs.reshape(-1).astype(np.int64))
        rope_theta = c.get("rope_theta", 10000.0) if c.get("position", "learned") == "rope" else None
        h = p["wte"][inp] if rope_theta is not None else p["wte"][inp] + p["wpe"][torch.arange(B * S) % S]
        aux_sum = z_sum = 0.0
        inputs, mids = [], []  # each block's input and attention output: what ScMoE taps
        scmoe = c.get("arch", "moe") == "scmoe"
        for l in range(c["layers"]):
            b = f"blocks.{l}."
            inputs.append(h)
            a = h + attention(self.norm(h, b + "ln1"), p[b + "attn.w_qkv"], p[b + "attn.b_qkv"],
                              p[b + "attn.w_proj"], p[b + "attn.b_proj"], B, S, c["heads"], mm, rope_theta,
                              c.get("kv_heads", 0))
            mids.append(a)
            x = self.norm(a, b + "ln2")
            first_dense = c.get("first_dense_blocks", 0)  # DeepSeek-V3's first_k_dense_replace
            if c["moe_every"] > 0 and l >= first_dense and (l - first_dense) % c["moe_every"] == c["moe_every"] - 1:
                moe_in = x
                if scmoe:
                    tap = {"pos1": inputs[l], "pos2": mids[l - 1] if l else None,
                           "pos3": inputs[l - 1] if l else None}[c["scmoe_tap"]]
                    moe_in = self.norm(tap, b + "ln_moe")
                y, aux, z, chosen = moe(moe_in, p[b + "moe.wg"], p[b + "moe.w1"], p[b + "moe.b1"], p[b + "moe.w2"],
                                        p[b + "moe.b2"], c["top_k"], c["capacity_factor"],
                                        c.get("gate_normalize", True), self.bias.get(f"blocks.{l}"),
                                        c.get("expert_activation", "gelu"), c.get("router_score", "softmax"), bf16,
                                        (c.get("route_groups", 1), c.get("route_top_groups", 0)),
                                        c.get("routed_scaling_factor", 1.0),
                                        c["seq_len"] if c.get("aux_loss", "gshard") == "sequence" else 0,
                                        c.get("drop_policy", "position"))
                aux_sum = aux_sum + aux
                z_sum = z_sum + z
                self.load[l] = self.load.get(l, 0) + np.bincount(chosen.reshape(-1), minlength=c["experts"])
                if c.get("shared_expert_hidden", 0) > 0:
                    se = activate(mm(x, p[b + "se.w_fc"]) + p[b + "se.b_fc"], c.get("shared_expert_activation", "gelu"))
                    se = mm(se, p[b + "se.w_out"]) + p[b + "se.b_out"]
                    if c.get("coef_gate", False):
                        se = se * torch.sigmoid(mm(x, p[b + "se.w_cg"]) + p[b + "se.b_cg"])
                    y = y + se
            else:
                y = mm(activate(mm(x, p[b + "mlp.w_fc"]) + p[b + "mlp.b_fc"], c.get("mlp_activation", "gelu")),
                       p[b + "mlp.w_out"]) + p[b + "mlp.b_out"]
            h = a + y
        logits = mm(self.norm(h, "ln_f"), p["wte"].T)
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(targets.reshape(-1).astype(np.int64)))
        return ce, aux_sum, z_sum, logits

    def global_loss(self, folder, step):
        """The data-parallel loss: mean over ranks of (CE + aux_coef * aux + z_loss_coef * z); and
        per-rank logits. Counts each MoE block's choices over all ranks (update_bias reads them)."""
        total, ces, auxes, logits = 0.0, [], [], []
        self.load = {}
        self.rank_totals = []  # each rank's share of the total (its gradients before the all-reduce)
        for r in range(self.P):
            ce, aux, z, lg = self.rank_loss(np.load(f"{folder}/rank{r}/inputs_{step}.npy"),
                                            np.load(f"{folder}/rank{r}/targets_{step}.npy"))
            self.rank_totals.append((ce + self.c["aux_coef"] * aux + self.c.get("z_loss_coef", 0.0) * z) / self.P)
            total = total + self.rank_totals[-1]
            ces.append(ce.item())
            auxes.append(float(aux))
            logits.append(lg)
        return total, sum(ces) / self.P, sum(auxes) / self.P, logits

    def update_bias(self):
        """DeepSeek-V3: bias[e] += rate * sign(mean load - load[e]), in float32 as ours."""
        rate = self.c.get("router_bias_rate", 0.0)
        for l, load in self.load.items():
            key = f"blocks.{l}"
            if key in self.bias:
                step = np.float32(rate) * np.sign(load.mean() - load).astype(np.float32)
                self.bias[key] = (self.bias[key] + step).astype(np.float32)


def bf16_wire_grads(model, total, experts_only=False):
    """total.backward(), then the replicated parameters' gradients as the bf16-wire all-reduce
    leaves them: each rank's share rounded to float32 then bf16, summed in float32 in rank order,
    the sum rounded to bf16 (comm/bf16_allreduce.h). Expert replicas (PPMoE with several
    tensor-parallel groups) are summed over the groups, a group's share being its ranks' (one
    owner per expert in a group holds the group's whole gradient). experts_only: the dense
    parameters keep the exact sum. Returns the exact gradients it replaced."""
    replicas = model.P // model.expert_ranks
    names = [n for n in model.params if not model.shard(n) and (
        (model.is_expert(n) and replicas > 1) if experts_only else (not model.is_expert(n) or replicas > 1))]
    weights = [model.params[n] for n in names]
    per_rank = [torch.autograd.grad(t, weights, retain_graph=True, allow_unused=True) for t in model.rank_totals]
    per_group = []  # each tensor-parallel group's share: the sum of its ranks' (they hold the same tokens)
    for g in range(replicas):
        ranks = per_rank[g * model.expert_ranks:(g + 1) * model.expert_ranks]
        per_group.append([sum(r[i] for r in ranks if r[i] is not None) if any(r[i] is not None for r in ranks)
                          else None for i in range(len(names))])
    total.backward()
    exact = {}
    with torch.no_grad():
        for i, n in enumerate(names):
            w = model.params[n]
            if w.grad is None:
                continue
            exact[n] = w.grad.clone()
            s = None
            for grads in (per_group if model.is_expert(n) else per_rank):
                g = grads[i] if grads[i] is not None else torch.zeros_like(w)
                b = g.float().bfloat16().float()
                s = b if s is None else s + b
            w.grad.copy_(s.bfloat16().double())
    return exact


def learning_rate(c, step):
    if step < c["warmup_steps"]:
        return c["lr"] * (step + 1) / c["warmup_steps"]
    span = max(1, c["max_steps"] - c["warmup_steps"])
    progress = min(1.0, (step - c["warmup_steps"]) / span)
    return c["min_lr"] + 0.5 * (c["lr"] - c["min_lr"]) * (1 + math.cos(math.pi * progress))


def adamw_step(model, state, c, step, lr):
    """Global-norm clipping then AdamW with decoupled decay (decay on weight matrices only)."""
    grads = {n: t.grad for n, t in model.params.items()}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    scale = c["grad_clip"] / norm if c["grad_clip"] > 0 and norm > c["grad_clip"] else 1.0
    b1, b2, eps = c["beta1"], c["beta2"], c["adam_eps"]
    t = step + 1
    with torch.no_grad():
        for n, w in model.params.items():
            g = grads[n] * scale
            m, v = state.setdefault(n, (torch.zeros_like(w), torch.zeros_like(w)))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            state[n] = (m, v)
            decay = 1 - lr * c["weight_decay"] if model.decays(n) else 1.0
            w.mul_(decay).sub_((lr / (1 - b1 ** t)) * m / (torch.sqrt(v / (1 - b2 ** t)) + eps))
            w.grad = None
    return norm
