#!/usr/bin/python3
"""Training with pipeline stages (--pp): the same model, data and effective batch give the one-rank
run's losses to float32 rounding, whatever the layout, and bad layouts are refused.

  - pp 2 on 2 ranks, pp 4 on 4, tp 2 x pp 2 (PPMoE) on 4, GPipe's order, the blocks split 3 + 1
    and pp 3 split by cost, all with 4
    micro-batches: the one-rank run with 4 micro-batches (train, aux and validation losses and
    the gradient norm to float32 rounding; without tensor parallelism the first step's loss bit
    for bit: stage by stage the forward does the same arithmetic);
  - ScMoE blocks inside stages: the same; and Llama's backbone (RMSNorm, rotary, SwiGLU);
  - pp 2 x dp 2 on 4 ranks: the all-to-all layer on 2 ranks (each data-parallel group's batch, its
    experts spread over the stage's 2 ranks);
  - the bubble is measured and reported beside 1F1B's formula (S - 1) / (M + S - 1);
  - a pp 2 x dp 2 checkpoint resumes bit for bit, holds the same tensors as a pp 1 checkpoint of
    the model, and loads in another layout (pp 1 on the same 4 ranks);
  - bad layouts: one clear line on every rank, non-zero exit, no hang.

Run: /usr/bin/python3 tests/cli/test_pipeline_train.py   (needs build/pipemoe)
"""
import csv
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402
from test_train_cli import one_error, tiny_config  # noqa: E402



def rows(path):
    return list(csv.DictReader(open(path)))


def close(a, b, rel=2e-6):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


def same_run(a, b, rel=2e-6):
    """Every step's losses and gradient norm within float32 rounding; the validation where both have one."""
    if len(a) != len(b) or not a:
        return False
    for x, y in zip(a, b):
        for key in ("train_loss", "aux_loss", "grad_norm"):
            if not close(float(x[key]), float(y[key]), rel):
                return False
        if (x["val_loss"] == "") != (y["val_loss"] == "") or (x["val_loss"] and not close(float(x["val_loss"]), float(y["val_loss"]), rel)):
            return False
    return True


def safetensors_names(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(tmp, layers=4, max_steps=6, eval_every=3, micro_batches=4)

        def train(name, ranks, *flags, check=True):
            log = os.path.join(tmp, name.replace(" ", "_") + ".csv")
            args = ["train", "--config", config, "--set", "save=", "--set", f"log_csv={log}"] + list(flags)
            proc = mpirun(ranks, args, timeout=300, check=check)
            summary = {}
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    summary = json.loads(line)
            return proc, log, summary

        _, one, _ = train("one rank", 1)
        reference = rows(one)
        for name, ranks, flags in [("pp 2", 2, ["--pp", "2"]),
                                   ("pp 4", 4, ["--pp", "4"]),
                                   ("tp 2 x pp 2", 4, ["--tp", "2", "--pp", "2", "--set", "moe_strategy=ppmoe"]),
                                   ("pp 2 gpipe", 2, ["--pp", "2", "--set", "pipeline_schedule=gpipe"]),
                                   ("pp 2 split 3,1", 2, ["--pp", "2", "--set", "pipeline_split=3,1"]),
                                   ("pp 3 split by cost", 3, ["--pp", "3", "--set", "pipeline_split=cost"])]:
            proc, log, summary = train(name, ranks, *flags)
            got = rows(log)
            f.check(same_run(got, reference), f"{name}: not the one-rank run's losses: {got[:2]} {reference[:2]}")
            if "tp" not in name:  # the split dense blocks sum their shares in another order
                f.check(got and got[0]["train_loss"] == reference[0]["train_loss"],
                        f"{name}: the first step's loss is not the one-rank run's bits")
            print(f"ok: {name} on {ranks} ranks gives the one-rank run's losses to float32 rounding "
                  f"(step 6 {got[-1]['train_loss']} vs {reference[-1]['train_loss']})", flush=True)
            if name == "pp 2":
                log_text = proc.stderr + proc.stdout
                f.check("tp 1 x dp 1 x pp 2" in log_text and "final norm and head" in log_text,
                        "the start lines print the layout table")
                f.check(summary.get("pp") == 2 and abs(summary.get("pipeline_bubble_formula", 0) - 0.2) < 1e-12
                        and summary.get("pipeline_bubble") is not None and 0 <= summary["pipeline_bubble"] < 1
                        and "pipeline wait" in log_text,
                        f"pp 2: the bubble is reported beside the formula: {summary}")
                print(f"ok: pp 2 x 4 micro-batches: measured bubble {summary['pipeline_bubble']:.2f}, "
                      f"1F1B formula {summary['pipeline_bubble_formula']:.2f}", flush=True)
            # what a stage keeps aside at once: 1F1B the first stage S micro-batches, GPipe all M
            held = {"pp 2": 2, "pp 4": 4, "pp 2 gpipe": 4}
            if name in held:
                f.check(summary.get("micro_batches_stashed_most") == held[name],
                        f"{name}: {summary.get('micro_batches_stashed_most')} micro-batches stashed at most, "
                        f"expected {held[name]}")

        # ScMoE inside stages (its taps never cross a stage: block 2, where stage 1 starts, is dense)
        scmoe = ["--set", "arch=scmoe", "--set", "shared_expert_hidden=32"]
        _, sc1, _ = train("scmoe one rank", 1, *scmoe)
        _, sc2, _ = train("scmoe pp 2", 2, "--pp", "2", *scmoe)
        f.check(same_run(rows(sc2), rows(sc1)), "ScMoE at pp 2: not the one-rank run's losses")
        print("ok: ScMoE at pp 2 gives the one-rank run's losses to float32 rounding", flush=True)

        # Llama's backbone inside stages (no position embedding on the first stage; the last
        # stage's final norm an RMSNorm): the same, and the first step's loss bit for bit
        llama = ["--set", "norm=rmsnorm", "--set", "position=rope", "--set", "mlp_activation=swiglu"]
        _, ll1, _ = train("llama one rank", 1, *llama)
        _, ll2, _ = train("llama pp 2", 2, "--pp", "2", *llama)
        f.check(same_run(rows(ll2), rows(ll1)) and rows(ll2)[0]["train_loss"] == rows(ll1)[0]["train_loss"],
                "Llama's backbone at pp 2: not the one-rank run's losses")
        f.check(rows(ll1)[0]["train_loss"] != reference[0]["train_loss"], "Llama's backbone: the same loss as GPT-2's")
        print("ok: Llama's backbone at pp 2 gives the one-rank run's losses to float32 rounding", flush=True)

        # data parallel around the pipeline: each dp group's batch, the experts spread over a stage
        _, ep2, _ = train("ep on 2", 2)
        _, ppdp, _ = train("pp 2 x dp 2", 4, "--pp", "2")
        f.check(same_run(rows(ppdp), rows(ep2)), "pp 2 x dp 2 on 4 ranks: not the losses of the all-to-all layer on 2")
        print("ok: pp 2 x dp 2 on 4 ranks gives the losses of the all-to-all layer on 2 ranks", flush=True)

        # checkpoints: resume bit for bit; the same tensors as pp 1; load at another layout
        save = os.path.join(tmp, "ck")
        mpirun(4, ["train", "--config", config, "--pp", "2", "--set", f"save={save}", "--stop-at", 3,
                   "--set", f"log_csv={tmp}/ck.csv"], timeout=300)
        mpirun(4, ["train", "--config", config, "--pp", "2", "--resume", save, "--set", "save=",
                   "--set", f"log_csv={tmp}/ck.csv"], timeout=300)
        f.check([r["train_loss"] for r in rows(f"{tmp}/ck.csv")] == [r["train_loss"] for r in rows(ppdp)],
                "pp 2 x dp 2 stopped at 3 and resumed: not the uninterrupted run's losses")
        print("ok: pp 2 x dp 2 stopped at step 3 and resumed gives the uninterrupted run's losses bit for bit", flush=True)
        save1 = os.path.join(tmp, "ck1")
        mpirun(4, ["train", "--config", config, "--set", f"save={save1}", "--stop-at", 3,
                   "--set", f"log_csv={tmp}/ck1.csv"], timeout=300)
        staged = safetensors_names(os.path.join(save, "step-000003", "model.safetensors"))
        whole = safetensors_names(os.path.join(save1, "step-000003", "model.safetensors"))
        f.check(staged == whole and "wte" in staged,
                f"the pp 2 checkpoint's tensors differ from pp 1's: {set(staged) ^ set(whole)}")
        print(f"ok: the pp 2 checkpoint holds the {len(whole)} tensors of a pp 1 checkpoint, with their shapes",
              flush=True)
        proc = mpirun(4, ["train", "--config", config, "--resume", save, "--set", "save=",
                          "--set", f"log_csv={tmp}/ck_pp1.csv"], timeout=300)
        resumed = rows(f"{tmp}/ck_pp1.csv")
        f.check(len(resumed) == 3 and abs(float(resumed[0]["train_loss"]) - float(rows(ppdp)[3]["train_loss"])) < 0.1,
                f"the pp 2 checkpoint at pp 1 on 4 ranks: {resumed[:1]} {proc.stderr[-300:]}")
        print(f"ok: the pp 2 checkpoint continues at pp 1 (step 4 loss {resumed[0]['train_loss'][:7]})", flush=True)
        # inference holds every block on every rank, whatever the layout that trained it
        proc = mpirun(1, ["generate", "--checkpoint", save, "--prompt", "The jury", "--tokens", 8, "--json"], check=False)
        texts = json.loads(proc.stdout.strip().splitlines()[-1])["texts"] if proc.returncode == 0 else []
        f.check(len(texts) == 1 and texts[0].startswith("The jury"), f"generate from the pp 2 checkpoint: {proc.stderr[-300:]}")
        print(f"ok: generate runs the pp 2 checkpoint on 1 rank: {texts[:1]!r}", flush=True)

        # bad layouts: one clear line, non-zero exit, no hang
        for ranks, flags, words in [(4, ["--pp", "3"], "does not divide the 4 ranks"),
                                    (4, ["--pp", "2", "--dp", "1"], "tp 1 x dp 1 x pp 2 = 2 ranks"),
                                    (4, ["--pp", "4", "--set", "layers=2"], "more pipeline stages than the model's 2 blocks"),
                                    (2, ["--pp", "2", "--set", "micro_batches=1"], "needs at least 2 micro-batches"),
                                    (2, ["--pp", "2", "--set", "pipeline_schedule=zb"], "must be \"1f1b\" or \"gpipe\""),
                                    (2, ["--pp", "2", "--set", "pipeline_split=2,1"], "gives 2 stages and 3 blocks"),
                                    (2, ["--pp", "2", "--set", "pipeline_split=half"], "'pipeline_split' must be"),
                                    (2, ["--pp", "2", "--set", "moe_every=1", "--set", "arch=scmoe",
                                         "--set", "shared_expert_hidden=32", "--set", "scmoe_tap=pos1", "--set", "layers=3"],
                                     None),
                                    (2, ["--pp", "2", "--set", "arch=scmoe", "--set", "shared_expert_hidden=32",
                                         "--set", "layers=6"], "which pipeline stage 1 leaves to stage 0"),
                                    (4, ["--pp", "2", "--set", "experts=3", "--set", "top_k=1"],
                                     "experts must be a multiple of the number of ranks of a pipeline stage")]:
            proc, _, _ = train("bad", ranks, *flags, check=False)
            if words is None:  # ScMoE tapping pos1 never reaches into another stage: it trains
                f.check(proc.returncode == 0, f"{flags}: exit {proc.returncode}, {proc.stderr[-400:]}")
                print(f"ok: {' '.join(flags)} on {ranks} ranks trains (pos1 taps stay inside a stage)", flush=True)
                continue
            one_error(f, proc, words, f"{' '.join(flags)} on {ranks} ranks")
    f.finish("test_pipeline_train")


if __name__ == "__main__":
    main()
