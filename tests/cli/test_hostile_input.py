#!/usr/bin/python3
"""Input a hostile user would try, and faults in a run: one clear error line and a non-zero exit
(never a crash, a hang or a run that goes on with nonsense), and nothing lost.

- configurations: values nested 100,000 deep, sizes no machine has, integers past 32 bits,
  non-finite numbers;
- checkpoints whose state.json describes an impossible model (generate) or an impossible step;
- a data file of megabytes without a space trains its tokenizer as an ordinary one does (it took
  minutes: tokenizer training was quadratic in a word's length);
- a NaN in a gradient is named (tensor and rank) at the step it appears: the run stops, or with
  nan_policy "skip" skips that update and goes on;
- a run killed after a checkpoint and resumed has one CSV row per step.

Run: /usr/bin/python3 tests/cli/test_hostile_input.py   (needs build/pipemoe)
"""
import csv
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun, mpirun_async  # noqa: E402
from test_train_cli import TINY, one_error, write_text  # noqa: E402


def train(ranks, config, *extra, check=True, timeout=180, env=None):
    return mpirun(ranks, ["train", "--config", config] + list(extra), timeout=timeout, check=check, env=env)


def rewrite_state(checkpoint, dest, change):
    """A copy of checkpoint whose latest step's state.json is passed through change(dict)."""
    shutil.copytree(checkpoint, dest)
    step = open(os.path.join(dest, "latest")).read().strip()
    path = os.path.join(dest, step, "state.json")
    state = json.load(open(path))
    change(state)
    json.dump(state, open(path, "w"))
    return dest


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        cfg = dict(TINY, data=text)
        config = os.path.join(tmp, "tiny.json")
        json.dump(cfg, open(config, "w"))

        # configurations
        deep = os.path.join(tmp, "deep.json")
        open(deep, "w").write('{"lr": ' + "[" * 100000 + "]" * 100000 + "}")
        configs = {"deep": deep}
        for name, change in [("layers", {"layers": 10 ** 9}), ("dmodel", {"d_model": 2 ** 40}),
                             ("memory", {"d_model": 16384, "layers": 512, "mlp_hidden": 65536, "heads": 16}),
                             ("seed", {"seed": -1}), ("frac", {"batch_size": 2.5})]:
            path = os.path.join(tmp, f"{name}.json")
            json.dump(dict(cfg, **change), open(path, "w"))
            configs[name] = path
        cases = [
            (["--config", deep], "nested", "a value nested 100,000 deep"),
            (["--config", configs["layers"]], "'layers' must be at most", "a billion layers"),
            (["--config", configs["dmodel"]], "out of range", "an integer past 32 bits"),
            (["--config", configs["memory"]], "GiB per rank", "a model larger than the machine"),
            (["--config", configs["seed"]], "out of range", "a negative seed"),
            (["--config", configs["frac"]], "whole number", "a fractional batch"),
            (["--config", config, "--set", "lr=" + "[" * 200 + "]" * 200], "nested", "--set nested deep"),
            (["--config", config, "--set", "nan_policy=ignore"], "nan_policy", "an unknown nan_policy"),
            (["--config", config, "--max-steps", 3000000000], "out of range", "--max-steps past 32 bits"),
            (["--config", config, "--seed", -3], "out of range", "--seed negative"),
        ]
        runs = [mpirun_async(2, ["train"] + args, timeout=60, check=False) for args, _, _ in cases]
        for (args, word, name), run in zip(cases, runs):
            proc = run.result()
            one_error(f, proc, word, name)
            f.check(len(proc.stderr) < 2000, f"{name}: a short message, not {len(proc.stderr)} bytes")

        # flags reach the configuration as signed integers: in range, they are taken
        ok = train(2, config, "--seed", 7, "--max-steps", 2, "--set", "save=", "--set", f"log_csv={tmp}/seed.csv")
        f.check(json.loads(ok.stdout.strip().splitlines()[-1])["steps"] == 2, "--seed 7 --max-steps 2 run")

        # checkpoints that describe the impossible
        ck = os.path.join(tmp, "ck")
        train(2, config, "--save", ck)
        for name, change, word in [
            ("heads0", lambda s: s["config"].update(heads=0), "impossible model"),
            ("heads5", lambda s: s["config"].update(heads=5), "impossible model"),
            ("layers-1", lambda s: s["config"].update(layers=-1), "impossible model"),
        ]:
            bad = rewrite_state(ck, os.path.join(tmp, name), change)
            proc = mpirun(1, ["generate", "--checkpoint", bad, "--prompt", "The", "--tokens", 5], timeout=60, check=False)
            one_error(f, proc, word, f"generate from a checkpoint with {name}")
        for name, step, word in [("step-5", -5, "corrupt"), ("step2^62", 2 ** 62, "corrupt"), ("step-past", 9, "past")]:
            bad = rewrite_state(ck, os.path.join(tmp, name), lambda s: s.update(step=step))
            one_error(f, train(2, config, "--resume", bad, check=False, timeout=60), word, f"resume a checkpoint at {name}")

        # tokenizer training on megabytes without a space, beside ordinary text of the same size
        sizes = 2 * 1024 * 1024
        nul = os.path.join(tmp, "nul.txt")
        open(nul, "wb").write(b"\0" * sizes)
        ordinary = os.path.join(tmp, "ordinary.txt")
        write_text(ordinary, sentences=sizes // 60)
        seconds = {}
        for name, data in [("ordinary", ordinary), ("no space", nul)]:
            start = time.time()
            train(1, config, "--data", data, "--max-steps", 1, "--set", "save=", "--set", f"log_csv={tmp}/tok.csv",
                  timeout=300)
            seconds[name] = time.time() - start
        print(f"ok: tokenizer on {sizes >> 20} MB: ordinary text {seconds['ordinary']:.1f} s, "
              f"no space {seconds['no space']:.1f} s", flush=True)

        # a NaN in a gradient: stopped, named; or skipped
        stop = train(2, config, "--set", "save=", check=False, env={"PIPEMOE_FAULT_NAN": "3:1"})
        one_error(f, stop, "step 3: not finite: rank 1: gradient", "a NaN gradient on rank 1 at step 3")
        f.check("moe" in stop.stderr, f"the gradient named is an expert's: {stop.stderr[-300:]}")
        skip = train(2, config, "--set", "save=", "--set", "nan_policy=skip", "--set", f"log_csv={tmp}/skip.csv",
                     env={"PIPEMOE_FAULT_NAN": "3:0"})
        f.check("step 3: not finite: rank 0" in skip.stderr and "update skipped" in skip.stderr,
                f"a skipped step says so: {skip.stderr[-500:]}")
        rows = list(csv.DictReader(open(f"{tmp}/skip.csv")))
        f.check(len(rows) == TINY["max_steps"] and all(r["train_loss"] not in ("nan", "inf") for r in rows[3:]),
                "the run went on with finite losses after the skipped step")
        print("ok: a NaN gradient stops the run naming rank and tensor, or its update is skipped", flush=True)

        # killed after the checkpoint at step 4, having logged steps 5-8: resumed, one row per step
        whole = os.path.join(tmp, "whole")
        train(2, config, "--save", whole, "--set", "save_every=4")
        before = list(csv.DictReader(open(os.path.join(whole, "log.csv"))))
        open(os.path.join(whole, "latest"), "w").write("step-000004\n")
        shutil.rmtree(os.path.join(whole, "step-000008"))
        train(2, config, "--save", whole, "--resume", whole)
        after = list(csv.DictReader(open(os.path.join(whole, "log.csv"))))
        f.check([r["step"] for r in after] == [str(s) for s in range(1, TINY["max_steps"] + 1)],
                f"one row per step after the resume: {[r['step'] for r in after]}")
        f.check([r["train_loss"] for r in after] == [r["train_loss"] for r in before], "and the same losses")
        print("ok: a resumed run's CSV has one row per step", flush=True)
    f.finish("test_hostile_input")


if __name__ == "__main__":
    main()
