#!/usr/bin/python3
"""What a MoE layer keeps from its forward for its backward, and that it stays flat.

- `layer --json` held_for_backward_mb is exactly what the backward needs: the experts' inputs
  (EP: the deduplicated dispatch's rows, each token's once, where the experts read them; PPMoE:
  none, its experts read them in the layer's input; both: a pointer per expert row), their
  activations act (bf16 in a bf16 layer: 2 bytes a value), their pre-activations (always fp32)
  and, for EP, the outputs per choice the gate's backward reads as they came off the wire (bf16 in
  a bf16 layer; PPMoE: the experts' outputs, fp32); none of the all-to-all's other buffers.
  Checked against the formula on 1 rank, dropless, at degree 1 (every token's row sent once, to
  the rank itself, for its two choices; a later chunk whose repeats are under a tenth of its rows
  sends each row again: moe/unique_rows.h), GeLU and SwiGLU, EP and PPMoE, fp32 and bf16; on 2
  ranks bf16 keeps less than fp32.
- The peak resident memory of a layer does not grow with the iterations (passes free and allocate
  the same large buffers every step: the block cache must hand them back out, where glibc's arenas
  grew by 20 MB an iteration).
- Its large buffers sit in transparent huge pages where the kernel gives them to the programs
  that ask (`huge_pages_mb`), and not with PIPEMOE_HUGE_PAGES=0.

Run: /usr/bin/python3 tests/cli/test_memory.py   (needs build/pipemoe)
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import Failures, mpirun  # noqa: E402

MB = 1 << 20


def layer(ranks, *extra):
    args = ["layer", "--tokens", 512, "--model-dim", 64, "--hidden", 96, "--experts", 4, "--iters", 1, "--warmup", 0,
            "--alone-iters", 0, "--json"] + list(extra)
    return json.loads(mpirun(ranks, args).stdout.strip().splitlines()[-1])


def expected_bytes(j):
    M, H, rows, T = j["model_dim"], j["hidden"], j["expert_rows_max"], j["tokens"]
    H1 = 2 * H if j["activation"] == "swiglu" else H
    saved = 2 if j["dtype"] == "bf16" else 4
    # the inputs: EP's where the dispatch left them, each token's row once (the layer's precision),
    # PPMoE's in x (not the pass's); a pointer to each expert row's
    inputs = (T * M * saved if j["strategy"] == "ep" else 0) + rows * 8
    # act in the layer's precision, hpre fp32, and the outputs the gate's backward reads: EP's as
    # they came off the wire (the layer's precision), PPMoE's the experts' own (fp32)
    outputs = saved if j["strategy"] == "ep" else 4
    return inputs + rows * (H * saved + H1 * 4 + M * outputs)


def main():
    f = Failures()
    for strategy in ("ep", "ppmoe"):
        for activation in ("gelu", "swiglu"):
            held = {}
            for dtype in ("fp32", "bf16"):
                j = layer(1, "--strategy", strategy, "--activation", activation, "--dtype", dtype, "--degree", 1,
                          "--capacity-factor", 0)
                f.check(j["expert_rows_max"] == 2 * j["tokens"], f"{j['expert_rows_max']} rows, not 2 per token")
                held[dtype] = j["held_for_backward_mb"] * MB
                f.check(abs(held[dtype] - expected_bytes(j)) < 1,
                        f"{strategy} {activation} {dtype}: held {held[dtype]:.0f} bytes, expected {expected_bytes(j)}")
            print(f"{strategy} {activation}: held for the backward {held['fp32'] / MB:.2f} MB fp32, "
                  f"{held['bf16'] / MB:.2f} MB bf16", flush=True)
    held2 = {d: layer(2, "--dtype", d, "--degree", 2)["held_for_backward_mb"] for d in ("fp32", "bf16")}
    f.check(held2["bf16"] < 0.8 * held2["fp32"], f"2 ranks: bf16 keeps {held2['bf16']:.2f} MB, fp32 {held2['fp32']:.2f} MB")

    # resident memory flat over iterations (buffers of several MB: the block cache's sizes); not
    # under a sanitizer (scripts/sanitize), whose quarantine holds freed memory and which caches no blocks
    if os.environ.get("PIPEMOE_SANITIZED"):
        print(f"resident memory not checked: built with the {os.environ['PIPEMOE_SANITIZED']} sanitizer", flush=True)
        f.finish("test_memory")
        return
    big = ["--tokens", 2048, "--model-dim", 256, "--hidden", 512, "--experts", 4, "--warmup", 0, "--alone-iters", 0,
           "--json"]
    peak, huge = {}, {}
    for iters in (2, 10):
        j = json.loads(mpirun(2, ["layer", "--iters", iters] + big, timeout=300).stdout.strip().splitlines()[-1])
        peak[iters], huge[iters] = j["peak_rss_mb"], j["huge_pages_mb"]
    print(f"peak resident memory: {peak[2]:.1f} MB after 2 iterations, {peak[10]:.1f} MB after 10", flush=True)
    f.check(peak[10] - peak[2] < 8, f"the layer's memory grows with the iterations: {peak[2]:.1f} -> {peak[10]:.1f} MB")

    # the large buffers ask for transparent huge pages (core/aligned.h): where the kernel hands them
    # to the programs that ask (madvise) they are there, and PIPEMOE_HUGE_PAGES=0 leaves them out
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode_file:
            mode = mode_file.read().strip()
    except OSError:
        mode = ""
    if os.environ.get("PIPEMOE_HUGE_PAGES") == "0":
        print("huge pages not checked: PIPEMOE_HUGE_PAGES=0 in this environment", flush=True)
    elif "[madvise]" in mode and huge[10] is not None:
        plain = json.loads(mpirun(2, ["layer", "--iters", 2] + big, timeout=300, env={"PIPEMOE_HUGE_PAGES": "0"})
                           .stdout.strip().splitlines()[-1])["huge_pages_mb"]
        print(f"huge pages at the end: {huge[10]:.0f} MB, with PIPEMOE_HUGE_PAGES=0 {plain:.0f} MB", flush=True)
        f.check(huge[10] >= 8, f"the layer's buffers are not in huge pages: {huge[10]:.0f} MB")
        f.check(plain == 0, f"PIPEMOE_HUGE_PAGES=0 still has {plain:.0f} MB in huge pages")
    else:
        print(f"huge pages not checked: THP '{mode}'", flush=True)
    f.finish("test_memory")


if __name__ == "__main__":
    main()
