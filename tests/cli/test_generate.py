#!/usr/bin/python3
"""pipemoe generate end to end on a small ScMoE model trained here: the key/value cache gives the
same text as re-running every window (--no-cache), sampled or greedy, for a batch of prompts, on 1
and 2 ranks (also for a bf16 model, and for the fp32 one run in bf16 with --dtype); expert offloading (host memory or the checkpoint on disk, at most one expert of a
layer resident, loaded when needed or prefetched) gives that same text too and keeps at most a
quarter of the experts resident; and bad input (a cache of 0 or more than a rank's experts, an
unknown mode, a missing or truncated checkpoint file) gets one clear error line, no hang.

Run: /usr/bin/python3 tests/cli/test_generate.py   (needs build/pipemoe)
"""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402
from test_train_cli import TINY, one_error, write_text  # noqa: E402

PROMPTS = ["--prompt", "The jury said", "--prompt", "The old county"]


def generate(ranks, checkpoint, *extra, check=True):
    return mpirun(ranks, ["generate", "--checkpoint", checkpoint, "--tokens", 20, "--json"] + PROMPTS + list(extra),
                  check=check)


def result(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        write_text(text)
        config = os.path.join(tmp, "scmoe.json")
        json.dump(dict(TINY, data=text, arch="scmoe", shared_expert_hidden=48, top_k=1, max_steps=12), open(config, "w"))
        ck = os.path.join(tmp, "ck")
        mpirun(2, ["train", "--config", config, "--save", ck])

        base = result(generate(1, ck))
        f.check(len(base["texts"]) == 2 and all(t.startswith(p) for t, p in zip(base["texts"], PROMPTS[1::2])),
                f"two sequences generated: {base['texts']}")
        for ranks, extra, name in [(1, ["--no-cache"], "no cache"), (2, [], "2 ranks"), (2, ["--no-cache"], "2 ranks, no cache")]:
            f.check(result(generate(ranks, ck, *extra))["texts"] == base["texts"], f"{name}: the same text as the cache")
        greedy = [result(generate(1, ck, "--temperature", 0, *extra))["texts"] for extra in ([], ["--no-cache"])]
        f.check(greedy[0] == greedy[1], "greedy: the same text with and without the cache")
        print(f"ok: cache, no cache, 1 and 2 ranks give the same text: {base['texts'][0][:40]!r}", flush=True)

        # prompts that begin as an earlier one run from a copy of its cached prefix: the texts of
        # running every prompt whole (--no-prefix-reuse), on 1 and 2 ranks (not --no-cache's: these
        # fill the window, where the cache slides and --no-cache does not)
        shared = ["--prompt", "The jury said", "--prompt", "The jury said it was", "--prompt", "The old county",
                  "--prompt", "The jury said it"]
        runs = {(ranks, extra): result(generate(ranks, ck, *shared, *extra))
                for ranks in (1, 2) for extra in ((), ("--no-prefix-reuse",))}
        texts = [r["texts"] for r in runs.values()]
        f.check(len(texts[0]) == 6 and all(t == texts[0] for t in texts),
                f"prompts sharing a prefix: the same texts with and without reuse, 1 and 2 ranks: {texts}")
        f.check(all(r["prefix_tokens_reused"] > 0 if not extra else r["prefix_tokens_reused"] == 0
                    for (_, extra), r in runs.items()),
                f"prefix positions reused: {[(k, r['prefix_tokens_reused']) for k, r in runs.items()]}")
        print(f"ok: prompts sharing a prefix reuse {runs[(1, ())]['prefix_tokens_reused']} cached positions, "
              f"the texts of running them whole", flush=True)

        for where in ("host", "disk"):
            for mode in ("resident", "blocking", "prefetch"):
                r = result(generate(1, ck, "--offload-experts", where, "--expert-cache", 1, "--offload-mode", mode))
                f.check(r["texts"] == base["texts"], f"offloaded to {where} ({mode}): the same text")
                bound = r["all_expert_bytes"] if mode == "resident" else r["all_expert_bytes"] // 4
                f.check(r["resident_expert_bytes_peak"] == bound,
                        f"{where} {mode}: {r['resident_expert_bytes_peak']} bytes of experts resident, expected {bound}")
                f.check(r["expert_loads"] >= (4 if mode == "resident" else 8), f"{where} {mode}: {r['expert_loads']} loads")
        r = result(generate(2, ck, "--offload-experts", "disk", "--expert-cache", 1))
        f.check(r["texts"] == base["texts"], "offloaded on 2 ranks: the same text")
        print("ok: offloaded experts (host, disk; resident, blocking, prefetch) give the same text", flush=True)

        # SwiGLU experts (W1 twice as wide) offload too: a DeepSeek-style tiny model
        swiglu_config = os.path.join(tmp, "swiglu.json")
        json.dump(dict(TINY, data=text, expert_activation="swiglu", shared_expert_hidden=24, top_k=2, capacity_factor=0,
                       router_bias_rate=0.01, aux_coef=0, max_steps=6), open(swiglu_config, "w"))
        swiglu_ck = os.path.join(tmp, "swiglu_ck")
        mpirun(2, ["train", "--config", swiglu_config, "--save", swiglu_ck])
        swiglu_base = result(generate(1, swiglu_ck))
        for where, mode in (("disk", "blocking"), ("host", "prefetch")):
            r = result(generate(1, swiglu_ck, "--offload-experts", where, "--expert-cache", 1, "--offload-mode", mode))
            f.check(r["texts"] == swiglu_base["texts"], f"SwiGLU experts offloaded to {where} ({mode}): the same text")
            f.check(r["resident_expert_bytes_peak"] == r["all_expert_bytes"] // 4,
                    f"SwiGLU {where} {mode}: {r['resident_expert_bytes_peak']} of {r['all_expert_bytes']} bytes resident")
        print("ok: SwiGLU experts offloaded give the same text", flush=True)

        # a bf16 model (its dense and expert activations kept in bf16 where only GEMMs read them):
        # the cache and 2 ranks give the text of re-running every window on one rank
        bf16_config = os.path.join(tmp, "bf16.json")
        json.dump(dict(TINY, data=text, dtype="bf16", max_steps=6), open(bf16_config, "w"))
        bf16_ck = os.path.join(tmp, "bf16_ck")
        mpirun(2, ["train", "--config", bf16_config, "--save", bf16_ck])
        bf16_texts = [result(generate(ranks, bf16_ck, *extra))["texts"] for ranks, extra in
                      ((1, ["--no-cache"]), (1, []), (2, []), (2, ["--no-cache"]))]
        f.check(all(t == bf16_texts[0] for t in bf16_texts), f"bf16: cache, no cache, 1 and 2 ranks differ: {bf16_texts}")
        print(f"ok: a bf16 model generates the same text with and without the cache: {bf16_texts[0][0][:40]!r}",
              flush=True)
        # --dtype runs a checkpoint in the other precision: the fp32 one in bf16 (cache and 2 ranks
        # agree), the bf16 one as trained (the default) or in fp32
        as_bf16 = [result(generate(ranks, ck, "--dtype", "bf16", *extra)) for ranks, extra in
                   ((1, ["--no-cache"]), (1, []), (2, []))]
        f.check(base["dtype"] == "fp32" and all(r["dtype"] == "bf16" for r in as_bf16),
                f"dtype reported: {base['dtype']}, {[r['dtype'] for r in as_bf16]}")
        f.check(all(r["texts"] == as_bf16[0]["texts"] for r in as_bf16),
                f"the fp32 checkpoint in bf16: cache, no cache, 2 ranks differ: {[r['texts'] for r in as_bf16]}")
        own = result(generate(1, bf16_ck))
        f.check(own["dtype"] == "bf16" and result(generate(1, bf16_ck, "--dtype", "bf16"))["texts"] == own["texts"],
                "a bf16 checkpoint runs in bf16 by default")
        f.check(result(generate(1, bf16_ck, "--dtype", "fp32"))["dtype"] == "fp32", "--dtype fp32 on a bf16 checkpoint")
        print(f"ok: --dtype bf16 on an fp32 checkpoint: {as_bf16[0]['texts'][0][:40]!r}", flush=True)

        # Llama's backbone with grouped-query attention (one key/value head for TINY's two query
        # heads): the cache half the size, the same text with it and without, on 1 and 2 ranks
        llama_config = os.path.join(tmp, "llama.json")
        json.dump(dict(TINY, data=text, norm="rmsnorm", position="rope", mlp_activation="swiglu", kv_heads=1,
                       max_steps=6), open(llama_config, "w"))
        llama_ck = os.path.join(tmp, "llama_ck")
        mpirun(2, ["train", "--config", llama_config, "--save", llama_ck])
        llama_runs = [result(generate(ranks, llama_ck, *extra)) for ranks, extra in
                      ((1, ["--no-cache"]), (1, []), (2, []))]
        f.check(all(r["texts"] == llama_runs[0]["texts"] for r in llama_runs),
                f"Llama's backbone: cache, no cache, 1 and 2 ranks differ: {[r['texts'] for r in llama_runs]}")
        f.check(llama_runs[1]["kv_cache_bytes"] * 2 == base["kv_cache_bytes"] > 0,
                f"one key/value head of two: {llama_runs[1]['kv_cache_bytes']} cache bytes, multi-head "
                f"{base['kv_cache_bytes']}")
        print(f"ok: Llama's backbone with one key/value head generates the same text with and without the cache in "
              f"half the cache bytes ({llama_runs[1]['kv_cache_bytes']}): {llama_runs[0]['texts'][0][:40]!r}", flush=True)

        broken = os.path.join(tmp, "broken")
        shutil.copytree(ck, broken)
        step = open(os.path.join(broken, "latest")).read().strip()
        model_file = os.path.join(broken, step, "model.safetensors")
        os.truncate(model_file, os.path.getsize(model_file) // 2)
        missing = os.path.join(tmp, "missing")
        shutil.copytree(ck, missing)
        os.remove(os.path.join(missing, step, "model.safetensors"))
        cases = [
            (["--offload-experts", "disk", "--expert-cache", 0], "--expert-cache", "cache of 0"),
            (["--offload-experts", "host", "--expert-cache", 5], "--expert-cache", "cache above the experts"),
            (["--offload-experts", "disk"], "--expert-cache", "offloading without a cache size"),
            (["--offload-experts", "gpu", "--expert-cache", 1], "offload-experts", "unknown place"),
            (["--offload-experts", "disk", "--expert-cache", 1, "--offload-mode", "eager"], "offload-mode", "unknown mode"),
            (["--top-p", 0], "--top-p", "top-p 0"),
            (["--temperature", -1], "--temperature", "negative temperature"),
            (["--min-p", 2], "--min-p", "min-p 2"),
            (["--presence-penalty", 2.5], "--presence-penalty", "presence penalty 2.5"),
            (["--frequency-penalty", -3], "--frequency-penalty", "frequency penalty -3"),
            (["--dtype", "fp16"], "--dtype", "unknown dtype"),
        ]
        for extra, word, name in cases:
            one_error(f, generate(1, ck, *extra, check=False), word, name)
        one_error(f, generate(1, broken, "--offload-experts", "disk", "--expert-cache", 1, check=False), "corrupt",
                  "truncated expert file")
        one_error(f, generate(1, missing, "--offload-experts", "disk", "--expert-cache", 1, check=False), "cannot read",
                  "missing expert file")
    f.finish("test_generate")


if __name__ == "__main__":
    main()
