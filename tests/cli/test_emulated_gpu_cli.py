#!/usr/bin/python3
"""The command line on the emulated GPU (build/pipemoe_emulated_gpu: the CUDA backend's kernels as
coroutine thread blocks, its host code on a fake CUDA runtime, tests/cuda_emulation) against
build/pipemoe on the CPU backend: `--backend cuda` reaches every command, and what it computes is
the CPU's, byte for byte: layer dumps (EP, bf16 SwiGLU, PPMoE, dropless top-4 with a shared
expert), a checkpoint after 3 training steps, and text generated from it with the key/value cache.
The same with `--transport nccl` (the NCCL transport on a fake NCCL, ranks as threads) for the
layer and the training. The same comparisons scripts/gpu-check makes on a real GPU.

Run: /usr/bin/python3 tests/cli/test_emulated_gpu_cli.py   (needs build/pipemoe, build/pipemoe_emulated_gpu)
"""
import filecmp
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BINARY, ROOT, Failures, mpi_env  # noqa: E402
from test_train_cli import write_text  # noqa: E402

EMULATED = os.path.join(os.path.dirname(BINARY), "pipemoe_emulated_gpu")
SHAPE = ["--tokens", "256", "--model-dim", "64", "--hidden", "96", "--experts", "4", "--iters", "1", "--warmup", "0",
         "--degree", "2"]
VARIANTS = [["--top-k", "2"], ["--top-k", "2", "--dtype", "bf16", "--activation", "swiglu"],
            ["--top-k", "2", "--strategy", "ppmoe"], ["--top-k", "4", "--capacity-factor", "0", "--shared-hidden", "32"]]
TRAIN = ["train", "--config", os.path.join(ROOT, "configs", "demo.json"), "--set", "max_steps=3", "--set", "eval_every=3",
         "--set", "eval_batches=1", "--set", "log_every=1", "--set", "layers=2", "--set", "d_model=64",
         "--set", "mlp_hidden=128", "--set", "expert_hidden=128", "--set", "seq_len=32", "--set", "batch_size=4",
         "--set", "warmup_steps=1", "--set", "tokenizer_vocab=300", "--set", "plot=none"]


def run(binary, backend, args, transport="host"):
    cmd = ["timeout", "--kill-after=5", "300", binary, "--backend", backend, "--transport", transport,
           "--ranks-in-process", "2"] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=mpi_env())


def same_tree(a, b, skip=()):
    """Every file under a and b byte for byte (names in `skip` left out): the differing ones. A folder
    that is missing or empty differs: two failed runs must not compare equal."""
    if not any(files for _, _, files in os.walk(a)) or not any(files for _, _, files in os.walk(b)):
        return [f"(no files under {a if not os.path.isdir(a) or not os.listdir(a) else b})"]
    differ = []
    for folder, _, files in os.walk(a):
        for name in files:
            if name in skip:
                continue
            pa = os.path.join(folder, name)
            pb = os.path.join(b, os.path.relpath(pa, a))
            if not os.path.exists(pb) or not filecmp.cmp(pa, pb, shallow=False):
                differ.append(os.path.relpath(pa, a))
    return differ


def main():
    failures = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        # its own text: a clean clone has no corpus (scripts/fetch-corpus)
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        for i, variant in enumerate(VARIANTS):
            name = " ".join(variant)
            dumps = {}
            for binary, backend in ((EMULATED, "cuda"), (BINARY, "cpu")):
                dumps[backend] = os.path.join(tmp, f"layer{i}_{backend}")
                proc = run(binary, backend, ["layer"] + SHAPE + variant + ["--dump", dumps[backend]])
                failures.check(proc.returncode == 0, f"layer {name} on {backend}: {proc.stderr.strip()[-300:]}")
            # meta.json names the backend's bf16 path (bf16 runs): the rest of it must agree
            differ = same_tree(dumps["cuda"], dumps["cpu"], skip=("meta.json",))
            metas = [json.load(open(os.path.join(dumps[b], "meta.json"))) if os.path.exists(os.path.join(dumps[b], "meta.json"))
                     else {} for b in ("cuda", "cpu")]
            for m in metas:
                m.pop("bf16_path", None)
            differ += ["meta.json"] if metas[0] != metas[1] or not metas[0] else []
            if failures.check(not differ, f"layer {name}: the dumps differ in {differ[:5]}"):
                print(f"ok: layer {name}: the same bits on both backends", flush=True)
            if i != 1:  # the NCCL transport (on the fake NCCL) carries the all-to-alls and all-reduces
                nccl = os.path.join(tmp, f"layer{i}_nccl")
                # (the CPU backend: the transport alone changes, and the emulated GPU's GEMMs are slow)
                proc = run(EMULATED, "cpu", ["layer"] + SHAPE + variant + ["--dump", nccl], transport="nccl")
                failures.check(proc.returncode == 0, f"layer {name} over NCCL: {proc.stderr.strip()[-300:]}")
                differ = same_tree(nccl, dumps["cpu"])
                if failures.check(not differ, f"layer {name} over NCCL: the dumps differ in {differ[:5]}"):
                    print(f"ok: layer {name}: the same bits over NCCL", flush=True)

        proc = run(EMULATED, "cuda", ["layer"] + SHAPE + ["--json"], transport="nccl")
        report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        failures.check(report.get("backend", "").startswith("cuda (emulated GPU"), f"layer --json: backend {report}")
        failures.check(report.get("transport") == "nccl", f"layer --json: transport {report.get('transport')}")

        # where NCCL cannot run, and an unknown transport: one clear line, exit 2
        for binary, transport, expect in ((BINARY, "nccl", "the NCCL transport cannot run here"),
                                          (EMULATED, "tcp", "--transport must be host or nccl")):
            proc = run(binary, "cpu", ["layer"] + SHAPE, transport=transport)
            failures.check(proc.returncode == 2 and expect in proc.stderr,
                           f"--transport {transport}: exit {proc.returncode}, {proc.stderr.strip()[-300:]}")

        saves = {}
        for binary, backend, transport in ((EMULATED, "cuda", "host"), (BINARY, "cpu", "host"), (EMULATED, "cpu", "nccl")):
            key = backend if transport == "host" else transport
            saves[key] = os.path.join(tmp, f"train_{key}")
            proc = run(binary, backend, TRAIN + ["--set", f"save={saves[key]}", "--set", f"data={text}"], transport)
            failures.check(proc.returncode == 0, f"train on {key}: {proc.stderr.strip()[-300:]}")
        # (log.csv holds timings, state.json the save folder's name)
        for key in ("cuda", "nccl"):
            differ = same_tree(saves[key], saves["cpu"], skip=("log.csv", "log.png", "state.json"))
            if failures.check(not differ, f"train on {key}: the checkpoints differ in {differ}"):
                print(f"ok: train on {key}: the CPU's checkpoint", flush=True)

        # 4 ranks as tp 2 x pp 2 with PPMoE: NCCL's all-reduces in groups split twice, the stages'
        # sends and receives on the host transport beneath; the CPU backend, to stay quick
        pp = TRAIN + ["--tp", "2", "--pp", "2", "--set", "moe_strategy=ppmoe", "--set", "micro_batches=2",
                      "--set", f"data={text}"]
        for transport in ("host", "nccl"):
            saves["pp_" + transport] = os.path.join(tmp, f"pp_{transport}")
            cmd = ["timeout", "--kill-after=5", "300", EMULATED, "--transport", transport, "--ranks-in-process", "4"]
            proc = subprocess.run(cmd + pp + ["--set", f"save={saves['pp_' + transport]}"], capture_output=True,
                                  text=True, env=mpi_env())
            failures.check(proc.returncode == 0, f"train tp 2 x pp 2 over {transport}: {proc.stderr.strip()[-300:]}")
        differ = same_tree(saves["pp_nccl"], saves["pp_host"], skip=("log.csv", "log.png", "state.json"))
        if failures.check(not differ, f"train tp 2 x pp 2: the checkpoints differ over NCCL in {differ}"):
            print("ok: train tp 2 x pp 2 (4 ranks): the same checkpoint over NCCL", flush=True)

        texts = {}
        for binary, backend in ((EMULATED, "cuda"), (BINARY, "cpu")):
            proc = run(binary, backend, ["generate", "--checkpoint", saves[backend], "--prompt", "The jury said",
                                         "--prompt", "It was", "--tokens", "12", "--json"])
            failures.check(proc.returncode == 0, f"generate on {backend}: {proc.stderr.strip()[-300:]}")
            texts[backend] = json.loads(proc.stdout.strip().splitlines()[-1])["texts"] if proc.returncode == 0 else None
        if failures.check(texts["cuda"] is not None and texts["cuda"] == texts["cpu"],
                          f"generate: {texts['cuda']} against {texts['cpu']}"):
            print(f"ok: generate: the same text on both backends: {texts['cpu']}", flush=True)
    failures.finish("test_emulated_gpu_cli")


if __name__ == "__main__":
    main()
