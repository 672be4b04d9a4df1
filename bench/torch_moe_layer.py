#!/usr/bin/python3
"""A plain PyTorch expert-parallel MoE layer, timed forward + backward: the baseline we compare with.

What a careful PyTorch user would write (Tutel/DeepSpeed-style, fixed capacity): gate softmax and
top-k, capacity ceil(k*f*T/E), tokens scattered into an [E, C, M] buffer by index, all_to_all_single
over gloo, batched expert GEMMs (torch.bmm) with exact GeLU, all_to_all_single back, weighted
combine. Same semantics as `pipemoe layer`; one process per rank, one BLAS thread each by default.

  /usr/bin/python3 bench/torch_moe_layer.py --ranks 2 --tokens 2048 --model-dim 512 --hidden 1024 \
      --experts 8 --top-k 2 --capacity-factor 1.25 --iters 10 [--csv out.csv]
"""
import argparse
import csv
import math
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x):
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous())
        return out


def moe_forward(x, wg, w1, b1, w2, b2, args, world):
    T, M = x.shape
    E, k = args.experts, args.top_k
    El = E // world
    C = math.ceil(k * args.capacity_factor * T / E)
    probs = torch.softmax(x @ wg, dim=1)
    gate, idx = torch.topk(probs, k, dim=1)
    if k > 1:
        gate = gate / gate.sum(dim=1, keepdim=True)
    # slots: choice by choice, token by token (cumulative count per expert)
    onehot = torch.nn.functional.one_hot(idx.t().reshape(-1), E)  # [k*T, E], choice-major
    pos = (torch.cumsum(onehot, dim=0) - 1).mul(onehot).sum(dim=1).view(k, T).t()  # [T, k]
    keep = pos < C
    flat = (idx * C + pos)[keep]                  # slot index in [E*C]
    tok = torch.arange(T).unsqueeze(1).expand(T, k)[keep]
    buf = x.new_zeros(E * C, M).index_add(0, flat, x[tok])
    recv = AllToAll.apply(buf.view(world, El * C * M)).view(world, El, C, M)
    u = recv.permute(1, 0, 2, 3).reshape(El, world * C, M)
    h = torch.nn.functional.gelu(torch.baddbmm(b1.unsqueeze(1), u, w1))  # exact (erf) GeLU
    out = torch.baddbmm(b2.unsqueeze(1), h, w2)
    back = out.view(El, world, C, M).permute(1, 0, 2, 3).reshape(world, El * C * M)
    combined = AllToAll.apply(back).view(E * C, M)
    y = x.new_zeros(T, M).index_add(0, tok, combined[flat] * gate[keep].unsqueeze(1))
    return y


def worker(rank, world, port, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    M, H, E = args.model_dim, args.hidden, args.experts
    El = E // world
    x = torch.randn(args.tokens, M, generator=g, requires_grad=True)
    dy = torch.randn(args.tokens, M, generator=g)
    gw = torch.Generator().manual_seed(args.seed)
    wg = (torch.randn(M, E, generator=gw) / math.sqrt(M)).requires_grad_()
    w1 = (torch.randn(El, M, H, generator=g) / math.sqrt(M)).requires_grad_()
    b1 = (0.1 * torch.randn(El, H, generator=g)).requires_grad_()
    w2 = (torch.randn(El, H, M, generator=g) / math.sqrt(H)).requires_grad_()
    b2 = (0.1 * torch.randn(El, M, generator=g)).requires_grad_()
    fwd, bwd = [], []
    for it in range(args.warmup + args.iters):
        for p in (x, wg, w1, b1, w2, b2):
            p.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        y = moe_forward(x, wg, w1, b1, w2, b2, args, world)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        if it >= args.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    med = torch.tensor([statistics.median(fwd), statistics.median(bwd)])
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
    if rank == 0:
        results.put((med[0].item(), med[1].item()))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--csv", help="append one row to this CSV file")
    args = p.parse_args()
    if args.experts % args.ranks:
        sys.exit("torch_moe_layer: experts must be a multiple of ranks")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, results)) for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
        if pr.exitcode != 0:
            sys.exit(f"torch_moe_layer: a rank failed (exit {pr.exitcode})")
    fwd, bwd = results.get()
    blas = os.environ.get("OPENBLAS_CORETYPE", "auto")
    print(f"torch {torch.__version__} ({args.ranks} ranks x {args.threads} threads, OPENBLAS_CORETYPE={blas}): "
          f"forward {fwd:.2f} ms  backward {bwd:.2f} ms  step {fwd + bwd:.2f} ms")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["impl", "ranks", "tokens", "model_dim", "hidden", "experts", "top_k",
                            "capacity_factor", "forward_ms", "backward_ms", "step_ms"])
            w.writerow(["torch", args.ranks, args.tokens, args.model_dim, args.hidden, args.experts,
                        args.top_k, args.capacity_factor, f"{fwd:.3f}", f"{bwd:.3f}", f"{fwd + bwd:.3f}"])


if __name__ == "__main__":
    main()
