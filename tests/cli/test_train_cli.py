#!/usr/bin/python3
"""pipemoe train end to end on a small model: an interrupted and resumed run continues the exact
same loss curve; generation works from a checkpoint; and bad input (config, data, checkpoints,
ranks) gets one clear error line, a non-zero exit, no hang, and leaves existing checkpoints
byte for byte as they were.

Run: /usr/bin/python3 tests/cli/test_train_cli.py   (needs build/pipemoe)
"""
import csv
import hashlib
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402

TINY = {"seq_len": 32, "d_model": 32, "layers": 2, "heads": 2, "mlp_hidden": 64, "moe_every": 2, "experts": 4,
        "top_k": 2, "expert_hidden": 48, "batch_size": 4, "tokenizer_vocab": 300, "max_steps": 8, "eval_every": 4,
        "eval_batches": 2, "log_every": 2, "warmup_steps": 2, "lr": 0.003, "degree": "1",
        # no loss-curve PNG (0.6 s of matplotlib per run, and one in the background per validation):
        # the first run below draws one and checks it
        "plot": "none"}


def write_text(path, sentences=3000):
    """English-like text from a small grammar: enough for a tokenizer and a few steps."""
    rng = random.Random(5)
    nouns = "jury city election committee report river house story letter morning county state law".split()
    verbs = "said found made took gave saw kept asked told wrote read heard brought".split()
    adjs = "new old public recent small large early final general local great".split()
    lines = []
    for _ in range(sentences):
        lines.append(f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the "
                     f"{rng.choice(nouns)} of the {rng.choice(adjs)} {rng.choice(nouns)}.")
    open(path, "w").write("\n".join(lines) + "\n")


def tiny_config(tmp, **overrides):
    """A TINY model's configuration in tmp (tiny.json), on text written there (text.txt), with
    `overrides` over TINY's keys; returns the configuration's path."""
    text = os.path.join(tmp, "text.txt")
    write_text(text)
    config = os.path.join(tmp, "tiny.json")
    json.dump(dict(TINY, data=text, **overrides), open(config, "w"))
    return config


def train(ranks, config_path, *extra, check=True, timeout=300):
    return mpirun(ranks, ["train", "--config", config_path] + list(extra), timeout=timeout, check=check)


def losses(csv_path):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(open(csv_path))]


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def one_error(f, proc, word, name):
    lines = [l for l in proc.stderr.splitlines() if l.strip() and l.startswith("pipemoe: error")]
    f.check(proc.returncode != 0, f"{name}: exit code 0")
    f.check(len(lines) == 1 and word in lines[0], f"{name}: expected one error line naming '{word}', got {lines}")
    print(f"ok: {name} -> {lines[0] if lines else proc.stderr[-300:]}", flush=True)


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        cfg = dict(TINY, data=text)
        config = os.path.join(tmp, "tiny.json")
        json.dump(cfg, open(config, "w"))

        # an uninterrupted run, and one that stops at step 4 and resumes
        whole, parts = os.path.join(tmp, "whole"), os.path.join(tmp, "parts")
        out = train(2, config, "--save", whole, "--set", "save_every=4", "--set", "plot=")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        for key in ("train_loss", "val_loss", "unigram_entropy", "tokens_per_s", "steps"):
            f.check(key in result, f"the final JSON line has {key}")
        f.check(os.path.exists(os.path.join(whole, "log.csv")), "a CSV log")
        png = os.path.join(whole, "log.png")
        f.check(os.path.exists(png) and os.path.getsize(png) > 10000 and f"loss curve: {png}" in out.stderr,
                f"a loss-curve PNG beside the CSV, and said so: {out.stderr[-300:]}")
        rows = list(csv.DictReader(open(os.path.join(whole, "log.csv"))))
        for column in ("grad_norm", "dropped_share", "moe0_load_max", "moe0_load_mean"):
            f.check(column in rows[0], f"the CSV has {column}")
        # tokens routed per expert, all ranks: on average k * tokens per step / experts
        routed = TINY["top_k"] * TINY["batch_size"] * TINY["seq_len"] * 2 / TINY["experts"]
        f.check(all(float(r["moe0_load_mean"]) == routed and float(r["moe0_load_max"]) >= routed and
                    0 <= float(r["dropped_share"]) < 1 and float(r["grad_norm"]) > 0 for r in rows),
                f"expert load, dropped share and gradient norm in range (mean load {routed})")
        progress = [l for l in out.stderr.splitlines() if l.startswith("step") and "ETA" in l]
        f.check(len(progress) == TINY["max_steps"] // TINY["log_every"] and "grad norm" in progress[0] and
                "expert load" in progress[0], f"a progress line per window: {progress[:1]}")
        f.check("configuration: {" in out.stderr and "rank 1: experts 2-3" in out.stderr,
                "the resolved configuration and the layout printed at start")
        print("ok: CSV columns, progress lines, configuration and layout", flush=True)
        train(2, config, "--save", parts, "--stop-at", 4)  # as if interrupted after step 4
        resumed = train(2, config, "--save", parts, "--resume", parts, "--degree", "2")
        f.check("warning" not in resumed.stderr, f"a resume with the same schedule warns of nothing: {resumed.stderr}")
        f.check(losses(os.path.join(whole, "log.csv")) == losses(os.path.join(parts, "log.csv")),
                "the resumed run continues the exact same loss curve")
        print(f"ok: resume continues the same curve: {losses(os.path.join(parts, 'log.csv'))[-1]}", flush=True)

        # the gradient all-reduce after the backward instead of overlapping it: the same bits
        serial = os.path.join(tmp, "serial")
        train(2, config, "--save", serial, "--set", "save_every=4", "--set", "overlap_grad_allreduce=false")
        f.check(losses(os.path.join(whole, "log.csv")) == losses(os.path.join(serial, "log.csv")),
                "overlapping the gradient all-reduce changes no loss")
        print("ok: overlapped and serial gradient all-reduce give the same curve", flush=True)

        # bf16: trains, the same bits whatever the pipeline degrees, close to fp32 and not equal to it
        bf16_d1, bf16_d2 = os.path.join(tmp, "bf16_d1"), os.path.join(tmp, "bf16_d2")
        out = train(2, config, "--save", bf16_d1, "--set", "save_every=4", "--set", "dtype=bf16")
        train(2, config, "--save", bf16_d2, "--set", "save_every=4", "--set", "dtype=bf16", "--degree", "2")
        f.check("dtype bf16: GEMMs on bf16 operands" in out.stderr, "a bf16 run says so at start")
        f.check(json.loads(out.stdout.strip().splitlines()[-1]).get("dtype") == "bf16", "the final JSON has dtype bf16")
        fp32, bf16 = losses(os.path.join(whole, "log.csv")), losses(os.path.join(bf16_d1, "log.csv"))
        f.check(bf16 == losses(os.path.join(bf16_d2, "log.csv")), "bf16 at degree 2 gives the same curve as degree 1")
        f.check(len(bf16) == len(fp32) and bf16 != fp32 and
                all(abs(float(a[1]) - float(b[1])) < 0.02 * float(b[1]) for a, b in zip(bf16, fp32)),
                f"bf16's training loss within 2% of fp32's at every step, and not the same: {bf16} vs {fp32}")
        print(f"ok: bf16 trains (last {bf16[-1]} vs fp32 {fp32[-1]}), the same bits at degrees 1 and 2", flush=True)

        # schedules that do not fit the run are named
        short = train(2, config, "--max-steps", 2, "--set", "save=", "--set", f"log_csv={tmp}/short.csv")
        f.check("warning: the warm-up (2 steps) is as long as the run (2 steps)" in short.stderr,
                f"warm-up longer than the run: {short.stderr[-500:]}")
        longer = train(2, config, "--resume", whole, "--max-steps", 12, "--set", "save=",
                       "--set", f"log_csv={tmp}/longer.csv")
        f.check("trained with max_steps 8, this run says 12" in longer.stderr,
                f"a resume that reshapes the schedule: {longer.stderr[-500:]}")
        print("ok: warnings for a warm-up longer than the run and a reshaped schedule", flush=True)

        gen = mpirun(1, ["generate", "--checkpoint", whole, "--prompt", "The jury", "--tokens", 10])
        f.check(gen.stdout.startswith("The jury") and len(gen.stdout) > len("The jury"), f"generated: {gen.stdout!r}")
        print(f"ok: generate -> {gen.stdout.strip()[:60]!r}", flush=True)

        before = digest(whole)
        bad_key = os.path.join(tmp, "bad_key.json")
        json.dump(dict(cfg, dmodel=64), open(bad_key, "w"))
        not_json = os.path.join(tmp, "not.json")
        open(not_json, "w").write("{ seq_len: 32")
        empty = os.path.join(tmp, "empty.txt")
        open(empty, "w").close()
        corrupt = os.path.join(tmp, "corrupt")
        os.system(f"cp -r {whole} {corrupt}")
        latest = open(os.path.join(corrupt, "latest")).read().strip()
        model_file = os.path.join(corrupt, latest, "model.safetensors")
        os.truncate(model_file, os.path.getsize(model_file) // 2)
        garbled = os.path.join(tmp, "garbled")
        os.system(f"cp -r {whole} {garbled}")
        open(os.path.join(garbled, latest, "state.json"), "w").write("not json at all")
        blocker = os.path.join(tmp, "a-file")
        open(blocker, "w").close()
        cases = [
            (2, [bad_key], "dmodel", "unknown configuration key"),
            (2, [not_json], "not valid JSON", "configuration not JSON"),
            (2, [config, "--set", "heads=3"], "multiple of heads", "impossible value"),
            (2, [config, "--lr", -1], "'lr' must be positive", "negative learning rate"),
            (3, [config], "multiple of the number of ranks", "experts not divisible by ranks"),
            (2, [config, "--data", os.path.join(tmp, "missing.txt")], "no training data", "missing data"),
            (2, [config, "--data", empty], "is empty", "empty data"),
            (2, [config, "--resume", os.path.join(tmp, "nothing-here")], "not a checkpoint", "missing checkpoint"),
            (2, [config, "--resume", corrupt, "--max-steps", 12], "corrupt", "truncated checkpoint"),
            (2, [config, "--resume", garbled, "--max-steps", 12], "state.json is corrupt", "garbled checkpoint"),
            (2, [config, "--resume", whole, "--set", "d_model=64", "--max-steps", 12], "another model", "other shapes"),
            (3, [config, "--resume", whole, "--max-steps", 12], "multiple of the number of ranks",
             "resumed on ranks its experts do not divide"),
            (2, [config, "--save", os.path.join(blocker, "run")], "checkpoint folder", "unwritable save folder"),
            (2, [config, "--set", "arch=scmoe", "--set", "scmoe_tap=pos4"], "scmoe_tap", "a tap point that does not exist"),
            (2, [config, "--set", "arch=scmoe", "--set", "moe_every=1"], "only tap pos1", "scmoe in every block off pos1"),
            (2, [config, "--set", "arch=dense"], "arch", "an unknown architecture"),
            (2, [config, "--set", "top_k=0"], "top_k", "top-k 0"),
            (2, [config, "--set", "top_k=9"], "top_k", "top-k above the experts"),
            (2, [config, "--set", "route_groups=3"], "route_groups", "route groups that do not divide the experts"),
            (2, [config, "--set", "route_groups=2", "--set", "route_top_groups=3"], "route_top_groups",
             "more top groups than groups"),
            (2, [config, "--set", "route_groups=4", "--set", "route_top_groups=1"], "'top_k' 2 is more than the 1 experts",
             "top-k above the experts of the allowed groups"),
            (2, [config, "--set", "routed_scaling_factor=0"], "routed_scaling_factor", "a gate scale of 0"),
            (2, [config, "--set", "aux_loss=switch"], "'aux_loss' must be", "an unknown balance loss"),
            (2, [config, "--set", "drop_policy=random"], "'drop_policy' must be", "an unknown drop policy"),
            (2, [config, "--set", "bf16_order=fast"], "'bf16_order' must be \"dot\", \"amx\" or \"auto\"", "an unknown bf16 order"),
            (2, [config, "--set", "first_dense_blocks=-1"], "first_dense_blocks", "negative leading dense blocks"),
            (2, [config, "--set", "first_dense_blocks=1"], "leaves no MoE block",
             "leading dense blocks that leave no MoE block"),
            (2, [config, "--set", "z_loss_coef=-0.1"], "z_loss_coef", "a negative z-loss weight"),
            (2, [config, "--set", "router_bias_rate=-1"], "router_bias_rate", "a negative bias rate"),
            (2, [config, "--set", "gate_normalize=2"], "gate_normalize", "gate_normalize not a boolean"),
            (2, [config, "--set", "expert_activation=relu"], "expert_activation", "an unknown activation"),
            (2, [config, "--set", "dtype=fp16"], "dtype", "an unknown dtype"),
            (2, [config, "--set", "grad_allreduce_dtype=fp16"], "grad_allreduce_dtype", "an unknown gradient wire"),
            (2, [config, "--set", "degree_tune=sometimes"], "degree_tune", "an unknown degree_tune"),
            (2, [config, "--set", "degree_tune_rounds=0"], "degree_tune_rounds", "no rounds of degree trials"),
            (2, [config, "--set", "degree_tune_window=-0.1"], "degree_tune_window", "a negative tuning window"),
            (2, [config, "--resume", whole, "--set", "arch=scmoe", "--set", "shared_expert_hidden=48", "--max-steps", 12], "another model",
             "a checkpoint of another architecture"),
            (2, [config, "--set", "norm=batchnorm"], "'norm'", "an unknown norm"),
            (2, [config, "--set", "position=alibi"], "'position'", "an unknown position encoding"),
            (2, [config, "--set", "position=rope", "--set", "rope_theta=0.5"], "rope_theta", "a rotary base below 1"),
            (2, [config, "--set", "position=rope", "--set", "d_model=30"], "must be even", "rotary with an odd head size"),
            (2, [config, "--set", "mlp_activation=relu"], "mlp_activation", "an unknown dense activation"),
            (2, [config, "--set", "kv_heads=3"], "kv_heads", "more key/value heads than heads"),
            (2, [config, "--set", "moe_strategy=ppmoe", "--set", "tp=2", "--set", "kv_heads=1"], "key/value heads do not divide",
             "one key/value head split over two ranks"),
            (2, [config, "--resume", whole, "--set", "norm=rmsnorm", "--max-steps", 12], "another model",
             "a LayerNorm checkpoint resumed as RMSNorm"),
            (2, [config, "--resume", whole, "--set", "position=rope", "--max-steps", 12], "another model",
             "a learned-position checkpoint resumed with rotary embeddings"),
            (2, [config, "--resume", whole, "--set", "kv_heads=1", "--max-steps", 12], "another model",
             "a multi-head checkpoint resumed with one key/value head"),
        ]
        for ranks, args, word, name in cases:
            one_error(f, train(ranks, *args, check=False, timeout=120), word, name)
        f.check(digest(whole) == before, "failed runs left the existing checkpoint untouched")
        f.check(not os.path.exists(os.path.join(blocker, "run")), "nothing written under a file")
    f.finish("test_train_cli")


if __name__ == "__main__":
    main()
