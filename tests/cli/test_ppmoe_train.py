#!/usr/bin/python3
"""Training with PPMoE layouts (moe_strategy ppmoe, --tp): the same losses as the layouts they must
equal, and bad layouts refused with one clear line on every rank.

  - tp 2 on 2 ranks and tp 4 on 4 ranks with tp_dense replicate: one tensor-parallel group holding
    the batch, the experts split over it, the dense blocks whole on every rank: bit for bit the
    one-rank run (train, aux and validation losses; the gradient
    norm to double rounding);
  - tp 2 x dp 2 on 4 ranks: bit for bit tp 1 x dp 2 on 2 ranks (each data-parallel group's
    experts and capacity are the same; expert gradients summed over the groups);
  - the all-to-all layer on 2 ranks (the same routing semantics: capacity per rank's batch) equal
    to tp 2 x dp 2 to float32 rounding;
  - micro_batches 2 (gradient accumulation): tp 2 bit for bit like one rank with 2 micro-batches,
    which equals the all-to-all layer on 2 ranks (each micro-batch the batch of one rank) to
    float32 rounding;
  - tp_dense split (the default: each rank its attention heads and MLP columns, the shares summed
    over the group; the tied embedding and head vocabulary-parallel, or replicated when the
    vocabulary does not divide): tp 2 like one rank, tp 2 x dp 2 like tp 1 x dp 2, to float32
    rounding;
  - a checkpoint of tp 2 x dp 2 resumes in its layout bit for bit, and loads in another layout
    (all-to-all EP on the same 4 ranks: checkpoints hold whole tensors);
  - Llama's backbone with grouped-query attention split over tp 2: the one-rank losses to float32
    rounding, and its checkpoint continues with the dense blocks whole on each rank.

Run: /usr/bin/python3 tests/cli/test_ppmoe_train.py   (needs build/pipemoe)
"""
import csv
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402
from test_train_cli import one_error, tiny_config  # noqa: E402


def losses(path):
    return [(r["step"], r["train_loss"], r["aux_loss"], r["val_loss"]) for r in csv.DictReader(open(path))]


def norms(path):
    return [float(r["grad_norm"]) for r in csv.DictReader(open(path))]


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(tmp, max_steps=10, eval_every=5)

        def train(name, ranks, *sets, check=True):
            log = os.path.join(tmp, name + ".csv")
            args = ["train", "--config", config, "--set", "save=", "--set", f"log_csv={log}"]
            for s in sets:
                args += ["--set", s]
            proc = mpirun(ranks, args, timeout=300, check=check)
            return proc, log

        runs = {}
        rep = "tp_dense=replicate"  # the dense blocks whole on every rank of a group: the one-rank bits
        for name, ranks, sets in [("one rank", 1, []),
                                  ("tp 2", 2, ["moe_strategy=ppmoe", "tp=2", rep]),
                                  ("tp 4", 4, ["moe_strategy=ppmoe", "tp=4", rep]),
                                  ("tp 1 x dp 2", 2, ["moe_strategy=ppmoe", "tp=1"]),
                                  ("tp 2 x dp 2", 4, ["moe_strategy=ppmoe", "tp=2", "dp=2", rep]),
                                  ("ep on 2", 2, []),
                                  ("one rank, 2 micro-batches", 1, ["micro_batches=2"]),
                                  ("tp 2, 2 micro-batches", 2, ["moe_strategy=ppmoe", "tp=2", "micro_batches=2", rep]),
                                  ("tp 2 split", 2, ["moe_strategy=ppmoe", "tp=2"]),
                                  ("tp 2 alone", 2, ["tp=2"]),
                                  ("one rank, vocabulary 301", 1, ["tokenizer_vocab=301"]),
                                  ("tp 2 split, vocabulary 301", 2, ["moe_strategy=ppmoe", "tp=2", "tokenizer_vocab=301"]),
                                  ("tp 2 x dp 2 split", 4, ["moe_strategy=ppmoe", "tp=2", "dp=2"])]:
            proc, log = train(name.replace(" ", "_"), ranks, *sets)
            runs[name] = log
            if name == "tp 2 x dp 2":
                f.check("tp 2 x dp 2 x pp 1" in proc.stderr + proc.stdout, "the start lines print the layout")
            if name == "tp 2 alone":  # tensor-parallel groups imply PPMoE's layer
                f.check("tp 2: moe_strategy ppmoe" in proc.stderr + proc.stdout, "tp 2 alone: the start lines say ppmoe")
            if name == "tp 2 split":
                f.check("head vocabulary-parallel" in proc.stderr + proc.stdout, "tp 2: the head is vocabulary-parallel")
            if name == "tp 2 split, vocabulary 301":  # an odd vocabulary cannot be split in two: replicated
                f.check("head replicated (the vocabulary does not divide" in proc.stderr + proc.stdout,
                        "tp 2, vocabulary 301: the start lines say the head is replicated")
        for a, b in [("tp 2", "one rank"), ("tp 4", "one rank"), ("tp 2 x dp 2", "tp 1 x dp 2"), ("tp 2 alone", "tp 2 split"),
                     ("tp 2, 2 micro-batches", "one rank, 2 micro-batches")]:
            same = losses(runs[a]) == losses(runs[b])
            close = all(abs(x - y) <= 1e-9 * y for x, y in zip(norms(runs[a]), norms(runs[b])))
            f.check(same and close and len(losses(runs[a])) == 10, f"{a}: not the losses of {b}")
            print(f"ok: {a} gives the losses of {b}, bit for bit", flush=True)
        # Megatron-style dense blocks: each rank's heads and MLP columns, the shares summed over the
        # group: the same model to float32 rounding
        for a, b in [("tp 2 split", "one rank"), ("tp 2 x dp 2 split", "tp 1 x dp 2"),
                     ("tp 2 split, vocabulary 301", "one rank, vocabulary 301")]:
            x, y = losses(runs[a]), losses(runs[b])
            f.check(len(x) == 10 and all(abs(float(p[i]) - float(q[i])) <= 2e-6 * abs(float(q[i]))
                                         for p, q in zip(x, y) for i in (1, 2) if q[i])
                    and all(abs(p - q) <= 1e-5 * q for p, q in zip(norms(runs[a]), norms(runs[b]))),
                    f"{a}: not the losses of {b} to float32 rounding: {x[:2]} {y[:2]}")
            print(f"ok: {a} (dense blocks split over the group) gives the losses of {b} to float32 rounding", flush=True)
        ep = [float(r[1]) for r in losses(runs["ep on 2"])]
        pp = [float(r[1]) for r in losses(runs["tp 2 x dp 2"])]
        f.check(all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(ep, pp)) and len(ep) == 10,
                f"tp 2 x dp 2 and the all-to-all layer on 2 ranks differ beyond float32 rounding: {ep} {pp}")
        print("ok: tp 2 x dp 2 equals the all-to-all layer on 2 ranks to float32 rounding", flush=True)
        mb = [float(r[1]) for r in losses(runs["one rank, 2 micro-batches"])]
        f.check(all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(ep, mb)) and len(mb) == 10,
                f"2 micro-batches on one rank and the all-to-all layer on 2 ranks differ: {mb} {ep}")
        print("ok: 2 micro-batches on one rank equal 2 ranks to float32 rounding", flush=True)

        # a checkpoint resumes in its own layout bit for bit, and loads in another
        save = os.path.join(tmp, "ck")
        layout = ["--set", "moe_strategy=ppmoe", "--set", "tp=2"]  # split: the checkpoint puts the slices together
        mpirun(4, ["train", "--config", config, "--set", f"save={save}", "--stop-at", 5,
                   "--set", f"log_csv={tmp}/ck.csv"] + layout, timeout=300)
        mpirun(4, ["train", "--config", config, "--resume", save, "--set", "save=",
                   "--set", f"log_csv={tmp}/ck.csv"] + layout, timeout=300)
        f.check(losses(f"{tmp}/ck.csv") == losses(runs["tp 2 x dp 2 split"]),
                "tp 2 x dp 2 stopped at 5 and resumed: not the losses of the uninterrupted run")
        print("ok: tp 2 x dp 2 stopped at step 5 and resumed gives the uninterrupted run's losses", flush=True)
        proc = mpirun(4, ["train", "--config", config, "--resume", save, "--set", "save=",
                          "--set", f"log_csv={tmp}/ck_ep.csv"], timeout=300)
        resumed = losses(f"{tmp}/ck_ep.csv")
        f.check("resuming a checkpoint of moe_strategy ppmoe tp 2 as moe_strategy ep tp 1" in proc.stderr + proc.stdout
                and len(resumed) == 5 and abs(float(resumed[0][1]) - float(losses(runs["tp 2 x dp 2 split"])[5][1])) < 0.05,
                f"the tp 2 x dp 2 checkpoint in the all-to-all layout: {resumed[:1]} {proc.stderr[-300:]}")
        print(f"ok: the tp 2 x dp 2 checkpoint continues as all-to-all EP on 4 ranks (step 6 loss {resumed[0][1]})",
              flush=True)

        # Llama's backbone with grouped-query attention split over the group (W_qkv's columns in
        # proportion heads : kv_heads : kv_heads, each rank its share of each): the one-rank run's
        # losses to float32 rounding; its checkpoint holds whole tensors and continues on one rank
        gqa = ["heads=4", "kv_heads=2", "norm=rmsnorm", "position=rope", "mlp_activation=swiglu"]
        _, gqa_one = train("gqa_one_rank", 1, *gqa)
        _, gqa_tp = train("gqa_tp_2_split", 2, "moe_strategy=ppmoe", "tp=2", *gqa)
        x, y = losses(gqa_tp), losses(gqa_one)
        f.check(len(x) == 10 and all(abs(float(p[1]) - float(q[1])) <= 2e-6 * abs(float(q[1])) for p, q in zip(x, y)),
                f"grouped-query attention split over tp 2: not the one-rank losses: {x[:2]} {y[:2]}")
        gqa_ck = os.path.join(tmp, "gqa_ck")
        gqa_sets = sum((["--set", s] for s in gqa), [])
        mpirun(2, ["train", "--config", config, "--set", f"save={gqa_ck}", "--stop-at", 5, "--set",
                   f"log_csv={tmp}/gqa_ck.csv", "--set", "moe_strategy=ppmoe", "--set", "tp=2"] + gqa_sets, timeout=300)
        # ...resumed with the dense blocks whole on each rank: they read W_qkv as the slices were put together
        mpirun(2, ["train", "--config", config, "--resume", gqa_ck, "--set", "save=", "--set",
                   f"log_csv={tmp}/gqa_resumed.csv", "--set", "moe_strategy=ppmoe", "--set", "tp=2", "--set",
                   "tp_dense=replicate"] + gqa_sets, timeout=300)
        resumed = losses(f"{tmp}/gqa_resumed.csv")
        f.check(len(resumed) == 5 and abs(float(resumed[0][1]) - float(x[5][1])) <= 1e-5 * abs(float(x[5][1])),
                f"the tp 2 grouped-query checkpoint with whole dense blocks: step 6 loss {resumed[:1]} vs {x[5][1]}")
        print(f"ok: grouped-query attention split over tp 2 gives the one-rank losses to float32 rounding, and its "
              f"checkpoint continues with the dense blocks whole (step 6 loss {resumed[0][1]} vs {x[5][1]})", flush=True)

        # bad layouts: one clear line, non-zero exit, no hang
        for ranks, sets, words in [(2, ["moe_strategy=ppmoe", "tp=3"], "must divide the 2 ranks"),
                                   (4, ["moe_strategy=ppmoe", "tp=4"], "2 attention heads do not divide"),
                                   (2, ["moe_strategy=ppmoe", "tp=2", "mlp_hidden=63"], "mlp_hidden 63 does not divide"),
                                   (2, ["moe_strategy=ppmoe", "tp=2", "tp_dense=rows"], "'tp_dense' must be"),
                                   (4, ["moe_strategy=ppmoe", "tp=4", "experts=6", rep], "6 experts do not divide over tensor-parallel"),
                                   (2, ["moe_strategy=ppmoe", "tp=2", "dp=2"], "tp 2 x dp 2 x pp 1 = 4 ranks")]:
            proc, _ = train("bad", ranks, *sets, check=False)
            one_error(f, proc, words, f"{' '.join(sets)} on {ranks} ranks")
    f.finish("test_ppmoe_train")


if __name__ == "__main__":
    main()
